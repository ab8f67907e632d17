"""The web app behind `saliencykit serve`: a single page served by the standard library.

Pick a bundled photo or upload one; choose the model, the methods and the target (predicted
class, a class, a contrast "A vs B", a group); see the overlays side by side with the
verbalization, metrics on request, and download the maps as a zip. Runs in a background
thread per request, reporting progress the page polls.

Served by Starlette on uvicorn (`Server`): the page and its script are inline and come from the
package, so the app works with no network at all (no CDN, no analytics). Explanations run one at a
time (the CPU is the bottleneck); up to `max_waiting` requests queue behind the running one and a
request beyond that gets 503 with a Retry-After estimate, never a wrong or mixed map.

HTTP interface (JSON):
    GET  /                      the page
    GET  /api/options           models, methods, bundled photos, class groups
    GET  /api/photo/NAME        a bundled photo (JPEG thumbnail)
    POST /api/explain           {photo | upload (base64), model, methods, target, metrics} -> {job}
                                (400: a bad request or not an image; 413: over the upload limit;
                                503 + Retry-After: the queue is full)
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
from pathlib import Path
from typing import Mapping

from ..errors import SaliencyError

DEFAULT_METHODS = ["gradcam", "integrated_gradients"]
MAX_UPLOAD_BYTES = 10 * 2 ** 20     # 10 MiB of file
MAX_PIXELS = 40_000_000             # 40 megapixels
MAX_JOBS = 32                       # finished jobs kept for download
MAX_WAITING = 8                     # requests queued or running at once; one more gets 503 + Retry-After
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
    from ..images import load_image, transparency_note

    alpha = transparency_note(img)
    if alpha:
        notes.append(f"{alpha[:1].upper()}{alpha[1:]}.")
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


class Busy(SaliencyError):
    """The queue is full: try again in `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


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
                 max_pixels: int = MAX_PIXELS, seed: int = 0, max_waiting: int = MAX_WAITING):
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
        self.max_waiting = max_waiting
        self._recent_seconds: list[float] = []  # how long the last runs took: the Retry-After estimate

    # ----------------------------------------------------------------------------- data
    def options(self) -> dict:
        from .. import data
        from ..methods import available
        from .verbalize import method_title

        methods = {n: {"family": i["family"], "cost": i["cost"], "title": method_title(n)}
                   for n, i in available(include_experimental=False).items()
                   if not i["requires"] and "BCHW" in i["layouts"]}
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
            waiting = sum(1 for j in self.jobs.values() if j.state == "running")
            if waiting >= self.max_waiting:
                per_run = sum(self._recent_seconds) / len(self._recent_seconds) if self._recent_seconds else 5.0
                retry = max(1, int(per_run * waiting + 0.999))
                raise Busy(f"the app is busy ({waiting} explanations waiting or running); try again in about "
                           f"{retry} s", retry)
            self.jobs[job.id] = job
            finished = [j for j in sorted(self.jobs.values(), key=lambda j: j.created) if j.state != "running"]
            for old in finished[:max(0, len(self.jobs) - MAX_JOBS)]:  # running jobs are never dropped
                self.jobs.pop(old.id, None)
        args = (job, model, image, name, list(methods), target, bool(request.get("metrics")), notes)
        threading.Thread(target=self._run, args=args, daemon=True).start()
        return job

    def _run(self, job: Job, model, image, name, methods, target, metrics, notes):
        try:
            job.update(step="waiting for the previous run to finish")
            with self._run_lock:
                job.result = None
                started = time.perf_counter()
                self._explain(job, model, image, name, methods, target, metrics, notes)
                self._recent_seconds = (self._recent_seconds + [time.perf_counter() - started])[-8:]
            job.update(state="done", step="done", done=job.total)
        except SaliencyError as err:
            job.update(state="error", message=str(err))
        except Exception as err:  # never a stack trace in the page; the server log keeps it
            traceback.print_exc(file=sys.stderr)
            job.update(state="error", message=f"Something went wrong while explaining ({type(err).__name__}: {err}).")

    def _explain(self, job, model, image, name, methods, target, metrics, notes):
        from ..methods import explain
        from .names import method_title
        from .report import PHOTO_WARNINGS, _display_copy, colour_bar, most_different
        from ..targets import as_target
        from .verbalize import verbalize
        from .viz import display_options, overlay

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
        v = verbalize(subject, x, exps[methods[0]], compare=[exps[m] for m in most_different(exps)])
        job.update(done=2 + len(methods))
        shown = _display_copy(image)
        notes = notes + list(dict.fromkeys(w["message"] for e in exps.values() for w in e.warnings
                                           if w["code"] in PHOTO_WARNINGS))
        result = {"photo": name, "model": model, "image": _jpeg_uri(shown), "predictions": preds,
                  "target": next(iter(exps.values())).target[0], "notes": notes,
                  "words": v.text, "facts": v.facts,
                  "colour_bars": {"signed": colour_bar(True), "unsigned": colour_bar(False)},
                  "overlays": [{"method": m, "title": method_title(m), "signed": e.signed,
                                "image": _jpeg_uri(overlay(shown, e.maps[0], signed=e.signed, **display_options(m))),
                                "seconds": round(e.seconds, 3), "passes": e.passes,
                                "warnings": [w.get("short", w["message"]) for w in e.warnings
                                             if w["code"] not in PHOTO_WARNINGS]} for m, e in exps.items()],
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
NO_STORE = {"Cache-Control": "no-store"}


def asgi_app(app: App):
    """The app's HTTP interface as a Starlette application (see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    page = (Path(__file__).parent / "report" / "templates" / "app.html").read_text(encoding="utf-8")

    def error(message: str, code: int = 400, headers: dict | None = None):
        return JSONResponse({"error": message}, code, headers={**NO_STORE, **(headers or {})})

    def guarded(fn):
        """Run the blocking `fn(request)` in the thread pool; a SaliencyError is a 404, anything else a
        500 with its type only (the server log keeps the traceback)."""
        async def endpoint(request):
            try:
                return await run_in_threadpool(fn, request)
            except SaliencyError as err:
                return error(str(err), 404)
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                return error(f"internal error ({type(err).__name__})", 500)
        return endpoint

    async def index(_request):
        return HTMLResponse(page, headers=NO_STORE)

    def options(_request):
        return JSONResponse(app.options(), headers=NO_STORE)

    def photo(request):
        from .. import data
        from .report import _display_copy

        name = request.path_params["name"]
        if name not in data.names():
            return error(f"no bundled photo {name!r}", 404)
        buf = io.BytesIO()
        _display_copy(data.image(name)).save(buf, format="JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg", headers=NO_STORE)

    async def job(request):
        found = app.jobs.get(request.path_params["id"])
        if found is None:
            return error("no such job (it may have expired)", 404)
        return JSONResponse(found.status(), headers=NO_STORE)

    def download(request):
        name = request.path_params["file"]
        if not name.endswith(".zip"):
            return error("not found", 404)
        job_id = name[:-4]
        return Response(app.download(job_id), media_type="application/zip",
                        headers={**NO_STORE, "Content-Disposition": f'attachment; filename="saliency-maps-{job_id}.zip"'})

    async def explain(request):
        # base64 inflates by 4/3; leave room for the JSON around it
        limit = app.max_upload_bytes * 4 // 3 + 64 * 1024
        too_large = error(f"the file is larger than the {_size(app.max_upload_bytes)} limit", 413)
        declared = request.headers.get("content-length")
        try:
            if declared is not None and int(declared) > limit:
                await _drain(request, 16 * limit)
                return too_large
        except ValueError:
            return error("bad Content-Length")
        body = bytearray()
        async for chunk in request.stream():  # a body sent without a length is capped as it comes
            body += chunk
            if len(body) > limit:
                await _drain(request, 16 * limit)
                return too_large
        try:
            payload = json.loads(bytes(body) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error("the request is not valid JSON")
        try:
            submitted = await run_in_threadpool(app.submit, payload)
        except Busy as err:
            return error(str(err), 503, {"Retry-After": str(err.retry_after)})
        except SaliencyError as err:
            return error(str(err))
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            return error(f"internal error ({type(err).__name__})", 500)
        return JSONResponse({"job": submitted.id}, headers=NO_STORE)

    async def http_error(_request, exc):
        return error("not found" if exc.status_code == 404 else str(exc.detail), exc.status_code)

    routes = [Route("/", index), Route("/index.html", index), Route("/api/options", guarded(options)),
              Route("/api/photo/{name}", guarded(photo)), Route("/api/job/{id}", job),
              Route("/api/download/{file}", guarded(download)), Route("/api/explain", explain, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


async def _drain(request, cap: int) -> None:
    """Read (and drop) what the client still sends, up to `cap` bytes, so that it gets the answer
    rather than a broken connection; a body far beyond any sane size just gets the connection closed."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                break
    except Exception:  # noqa: BLE001  the client went away: nothing left to answer
        pass


class Server:
    """The app on uvicorn, listening on `host:port` (port 0: a free one, `server_address[1]`).

    `serve_forever()` runs it in the calling thread until `shutdown()` (from another thread) or
    Ctrl-C; `server_close()` releases the socket.
    """

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 7860):
        import socket

        try:
            import starlette  # noqa: F401
            import uvicorn
        except ImportError:
            raise SaliencyError("the web app needs Starlette and uvicorn: pip install 'saliencykit[app]'") from None

        self.app = app
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError:
            self.socket.close()
            raise
        self.socket.listen(2048)  # connections made before serve_forever wait in the backlog
        self.server_address = self.socket.getsockname()[:2]
        # log_config=None: the server leaves the process's logging as it found it; warnings and
        # errors still reach stderr
        config = uvicorn.Config(asgi_app(app), log_config=None, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self):
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float = 30):
        self._server.should_exit = True
        self._stopped.wait(timeout)

    def server_close(self):
        self.socket.close()


def make_server(app: App | None = None, host: str = "127.0.0.1", port: int = 7860) -> Server:
    """The HTTP server (not started). Port 0 picks a free port (`server.server_address[1]`)."""
    return Server(app or App(), host, port)


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


__all__ = ["App", "Busy", "make_server", "serve", "decode_upload", "parse_target"]
