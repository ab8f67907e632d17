"""The web app behind `saliencykit serve`: a single page served by the standard library.

Pick a bundled photo or upload one; choose the model, the methods and the target (predicted
class, a class, a contrast "A vs B", a group); see the overlays side by side with the
verbalization, metrics on request, and download the maps as a zip. Runs in a background
thread per request, reporting progress the page polls.

Built on `http.server` (no web framework): the page and its script are inline, so the app
works with no network at all and adds no dependency.

HTTP interface (JSON):
    GET  /                      the page
    GET  /api/options           models, methods, bundled photos, class groups
    GET  /api/photo/NAME        a bundled photo (JPEG thumbnail)
    POST /api/explain           {photo | upload (base64), model, methods, target, metrics} -> {job}
    GET  /api/job/ID            {state: running|done|error, progress, message, result}
    GET  /api/download/ID.zip   the maps of a finished job (npz + json + overlay PNG per method)
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import sys
import threading
import time
import traceback
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote

from ..errors import SaliencyError

DEFAULT_METHODS = ["gradcam", "integrated_gradients"]
MAX_UPLOAD_BYTES = 10 * 2 ** 20     # 10 MiB of file
MAX_PIXELS = 40_000_000             # 40 megapixels
MAX_JOBS = 32                       # finished jobs kept for download
APP_METRICS = ("deletion", "insertion")
METRIC_STEPS = 16                   # points per deletion/insertion curve in the app (fast)


def _size(n: float) -> str:
    return f"{n / 1024:.0f} kB" if n < 2 ** 20 else f"{n / 2 ** 20:.1f} MB".replace(".0 MB", " MB")


def _jpeg_uri(pil_image) -> str:
    buf = io.BytesIO()
    pil_image.convert("RGB").save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_upload(payload: str, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS):
    """A base64 (or data-URI) upload -> (RGB PIL image, notes). Raises SaliencyError with a
    message a person can act on: not an image, too large a file, too many pixels."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(payload, str) or not payload:
        raise SaliencyError("the upload is empty")
    if payload.startswith("data:"):
        payload = payload.split(",", 1)[-1]
    if len(payload) * 3 // 4 > max_bytes:
        raise SaliencyError(f"the file is about {_size(len(payload) * 3 / 4)}; the limit is {_size(max_bytes)}")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise SaliencyError("the upload could not be decoded (it is not a file sent by this page)") from None
    if not raw:
        raise SaliencyError("the uploaded file is empty")
    notes = []
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise SaliencyError(f"the image is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels); the limit is "
                                    f"{max_pixels / 1e6:.0f} megapixels — please resize it")
            mode = im.mode
            im.load()
            img = im.copy()
    except SaliencyError:
        raise
    except Image.DecompressionBombError:
        raise SaliencyError("the image has too many pixels to open safely; please resize it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise SaliencyError("the uploaded file is not an image this app can read (use JPEG, PNG, BMP, GIF, "
                            "TIFF or WebP)") from None
    if mode in ("L", "LA", "1", "I", "I;16", "F"):
        notes.append("This is a grayscale photo: it was converted to colour (three equal channels); "
                     "the model was trained on colour photos, so expect less confident predictions.")
    from ..images import load_image

    return load_image(img), notes


def parse_target(spec: Mapping | None):
    """{"kind": "top"|"class"|"contrast"|"group", "a": ..., "b": ...} -> a Target (None = top-1)."""
    from ..targets import Class, Contrast, Group

    spec = dict(spec or {})
    kind = spec.get("kind", "top") or "top"

    def label(key, what):
        v = str(spec.get(key, "")).strip()
        if not v:
            raise SaliencyError(f"{what} is empty: type a class name or index")
        return int(v) if v.isdigit() else v

    if kind == "top":
        return None
    if kind == "class":
        return Class(label("a", "the class"))
    if kind == "contrast":
        return Contrast(label("a", "the first class"), vs=label("b", "the class to contrast with"))
    if kind == "group":
        return Group(str(spec.get("a", "")).strip() or "?")
    raise SaliencyError(f"unknown target kind {kind!r}")


class Job:
    def __init__(self):
        self.id = uuid.uuid4().hex[:12]
        self.state = "running"
        self.done = 0
        self.total = 1
        self.step = "starting"
        self.message = None
        self.result = None
        self.explanations = {}
        self.image = None
        self.created = time.time()
        self.lock = threading.Lock()

    def update(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, v)

    def status(self) -> dict:
        with self.lock:
            return {"id": self.id, "state": self.state, "progress": {"done": self.done, "total": self.total,
                                                                     "step": self.step},
                    "message": self.message, "result": self.result if self.state == "done" else None}


class App:
    """The app's state: loaded models (cached), jobs, limits.

    `models`: the model names offered (default: the bundled pretrained ones); `subjects`: already
    loaded `Subject`s by name (offered as they are when `models` is not given).
    """

    def __init__(self, models=None, subjects: Mapping | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int = MAX_PIXELS, seed: int = 0):
        from ..models import available_models

        self.subjects = dict(subjects or {})
        if models is not None:
            self.models = list(models)
        elif self.subjects:
            self.models = list(self.subjects)
        else:
            self.models = [m for m in ("efficientnet_lite0", "mobilenet_v2") if m in available_models()]
        if not self.models:
            raise SaliencyError("the app needs at least one model")
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.seed = seed
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._run_lock = threading.Lock()  # one explanation at a time: the CPU is the bottleneck

    # ----------------------------------------------------------------------------- data
    def options(self) -> dict:
        from .. import data
        from ..methods import available
        from .verbalize import method_title

        methods = {n: {"family": i["family"], "cost": i["cost"], "title": method_title(n)}
                   for n, i in available(include_experimental=False).items()}
        groups = sorted(getattr(self.subjects.get(self.models[0]), "groups", {}) or {}) if self.models[0] in \
            self.subjects else sorted(_imagenet_groups())
        return {"models": self.models, "methods": methods, "default_methods": DEFAULT_METHODS,
                "photos": list(data.PHOTOS), "groups": groups, "metrics": self.metrics_available(),
                "limits": {"upload_mb": self.max_upload_bytes / 2 ** 20, "megapixels": self.max_pixels / 1e6}}

    @staticmethod
    def metrics_available() -> bool:
        from .report import metrics_available

        return metrics_available()

    def subject(self, name: str):
        if name not in self.models:
            raise SaliencyError(f"unknown model {name!r}; choose one of {', '.join(self.models)}")
        with self._model_lock:
            if name not in self.subjects:
                from ..models import load_model

                self.subjects[name] = load_model(name)
            return self.subjects[name]

    # ----------------------------------------------------------------------------- jobs
    def submit(self, request: dict) -> Job:
        """Check the request (fast errors come back at once), then explain in the background."""
        from .. import data
        from ..methods import get

        if not isinstance(request, dict):
            raise SaliencyError("the request must be a JSON object")
        methods = request.get("methods") or []
        if not isinstance(methods, list) or not methods:
            raise SaliencyError("choose at least one method")
        for m in methods:
            get(m)
        model = request.get("model") or self.models[0]
        if model not in self.models:
            raise SaliencyError(f"unknown model {model!r}; choose one of {', '.join(self.models)}")
        notes = []
        if request.get("upload"):
            image, notes = decode_upload(request["upload"], self.max_upload_bytes, self.max_pixels)
            name = str(request.get("upload_name") or "upload")
        else:
            name = request.get("photo") or ""
            if name not in data.names():
                raise SaliencyError(f"choose a bundled photo or upload one (got {name!r})")
            image = data.image(name)
        target = parse_target(request.get("target"))
        job = Job()
        job.image = image
        with self._lock:
            self.jobs[job.id] = job
            for old in sorted(self.jobs.values(), key=lambda j: j.created)[:-MAX_JOBS]:
                self.jobs.pop(old.id, None)
        args = (job, model, image, name, list(methods), target, bool(request.get("metrics")), notes)
        threading.Thread(target=self._run, args=args, daemon=True).start()
        return job

    def _run(self, job: Job, model, image, name, methods, target, metrics, notes):
        try:
            job.update(step="waiting for the previous run to finish")
            with self._run_lock:
                job.result = None
                self._explain(job, model, image, name, methods, target, metrics, notes)
            job.update(state="done", step="done", done=job.total)
        except SaliencyError as err:
            job.update(state="error", message=str(err))
        except Exception as err:  # never a stack trace in the page; the server log keeps it
            traceback.print_exc(file=sys.stderr)
            job.update(state="error", message=f"Something went wrong while explaining ({type(err).__name__}: {err}).")

    def _explain(self, job, model, image, name, methods, target, metrics, notes):
        from ..methods import explain
        from .report import _display_copy
        from ..targets import as_target
        from .verbalize import method_title, verbalize

        total = 1 + len(methods) + 1 + (1 if metrics else 0)
        job.update(total=total, done=0, step=f"loading {model}")
        subject = self.subject(model)
        x = subject.preprocess(image)
        preds = subject.predict(x, k=5)[0]
        job.update(done=1)
        tgt = as_target(target)
        exps = {}
        for i, m in enumerate(methods):
            job.update(step=f"{method_title(m)} ({i + 1} of {len(methods)})")
            exps[m] = explain(subject, x, method=m, target=tgt, seed=self.seed)
            job.update(done=2 + i)
        job.update(step="putting it into words")
        v = verbalize(subject, x, exps[methods[0]], compare=[exps[m] for m in methods[1:2]])
        job.update(done=2 + len(methods))
        shown = _display_copy(image)
        result = {"photo": name, "model": model, "image": _jpeg_uri(shown), "predictions": preds,
                  "target": next(iter(exps.values())).target[0], "notes": notes,
                  "words": v.text, "facts": v.facts,
                  "overlays": [{"method": m, "title": method_title(m), "signed": e.signed,
                                "image": _jpeg_uri(e.overlay(shown)), "seconds": round(e.seconds, 3),
                                "passes": e.passes} for m, e in exps.items()],
                  "metrics": None, "metrics_note": None}
        if metrics:
            if self.metrics_available():
                job.update(step="measuring (deletion, insertion)")
                from ..metrics import evaluate

                h, w = x.shape[-2:]
                step = max(1, -(-h * w // METRIC_STEPS))
                ev = evaluate(subject, x, exps, metrics=list(APP_METRICS), target=tgt, seed=self.seed,
                              params={m: {"step": step} for m in APP_METRICS})
                result["metrics"] = {"columns": [{"name": m, "direction": ev.directions[m]} for m in ev.metrics],
                                     "rows": [{"method": r["method"], "values": [r[m] for m in ev.metrics]}
                                              for r in ev.summary()]}
            else:
                result["metrics_note"] = "Metrics are not available in this installation."
            job.update(done=total - 1)
        job.explanations = exps
        job.result = result

    def download(self, job_id: str) -> bytes:
        job = self.jobs.get(job_id)
        if job is None or job.state != "done":
            raise SaliencyError("no finished result with that id (it may have expired)")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                for m, e in job.explanations.items():
                    d = e.save(Path(tmp) / m)
                    for f in sorted(d.iterdir()):
                        z.write(f, f"{m}/{f.name}")
                    png = io.BytesIO()
                    e.overlay(job.image).save(png, format="PNG")
                    z.writestr(f"{m}/overlay.png", png.getvalue())
        return buf.getvalue()


def _imagenet_groups():
    from ..models import imagenet_groups

    return imagenet_groups()


# --------------------------------------------------------------------------------- HTTP
def make_handler(app: App):
    page = (Path(__file__).parent / "report" / "templates" / "app.html").read_text(encoding="utf-8")

    class Handler(BaseHTTPRequestHandler):
        server_version = "saliencykit"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: one line per error only
            if args and str(args[1] if len(args) > 1 else "").startswith(("4", "5")):
                sys.stderr.write("serve: " + fmt % args + "\n")

        def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj, code: int = 200):
            self._send(code, json.dumps(obj).encode("utf-8"), "application/json")

        def _error(self, message: str, code: int = 400):
            self._json({"error": message}, code)

        def do_GET(self):
            path = unquote(self.path.split("?", 1)[0])
            try:
                if path in ("/", "/index.html"):
                    self._send(200, page.encode("utf-8"), "text/html; charset=utf-8")
                elif path == "/api/options":
                    self._json(app.options())
                elif path.startswith("/api/photo/"):
                    from .. import data
                    from .report import _display_copy

                    name = path.rsplit("/", 1)[-1]
                    if name not in data.names():
                        return self._error(f"no bundled photo {name!r}", 404)
                    buf = io.BytesIO()
                    _display_copy(data.image(name)).save(buf, format="JPEG", quality=85)
                    self._send(200, buf.getvalue(), "image/jpeg")
                elif path.startswith("/api/job/"):
                    job = app.jobs.get(path.rsplit("/", 1)[-1])
                    if job is None:
                        return self._error("no such job (it may have expired)", 404)
                    self._json(job.status())
                elif path.startswith("/api/download/") and path.endswith(".zip"):
                    job_id = path.rsplit("/", 1)[-1][:-4]
                    body = app.download(job_id)
                    self._send(200, body, "application/zip",
                               {"Content-Disposition": f'attachment; filename="saliency-maps-{job_id}.zip"'})
                else:
                    self._error("not found", 404)
            except SaliencyError as err:
                self._error(str(err), 404)
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                self._error(f"internal error ({type(err).__name__})", 500)

        def do_POST(self):
            path = self.path.split("?", 1)[0]
            if path != "/api/explain":
                return self._error("not found", 404)
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self._error("bad Content-Length")
            # base64 inflates by 4/3; leave room for the JSON around it
            limit = app.max_upload_bytes * 4 // 3 + 64 * 1024
            if length > limit:
                # read (and drop) what the client sends so it gets the message rather than a broken
                # connection; a body far beyond any sane size just gets the connection closed
                if length <= 16 * limit:
                    left = length
                    while left > 0:
                        chunk = self.rfile.read(min(left, 1 << 20))
                        if not chunk:
                            break
                        left -= len(chunk)
                self.close_connection = True
                return self._error(f"the file is larger than the {_size(app.max_upload_bytes)} limit", 413)
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                return self._error("the request is not valid JSON")
            try:
                job = app.submit(request)
            except SaliencyError as err:
                return self._error(str(err))
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                return self._error(f"internal error ({type(err).__name__})", 500)
            self._json({"job": job.id})

    return Handler


def make_server(app: App | None = None, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """The HTTP server (not started). Port 0 picks a free port (`server.server_address[1]`)."""
    app = app or App()
    server = ThreadingHTTPServer((host, port), make_handler(app))
    server.daemon_threads = True
    server.app = app
    return server


def serve(host: str = "127.0.0.1", port: int = 7860, app: App | None = None, quiet: bool = False):
    """Run the app until interrupted."""
    try:
        server = make_server(app, host, port)
    except OSError as err:
        raise SaliencyError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    if not quiet:
        print(f"saliencykit app on http://{host}:{server.server_address[1]}/ (Ctrl+C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["App", "make_server", "serve", "decode_upload", "parse_target"]
