"""The web app under load, over loopback.

8 clients x 25 requests at once, mixing methods and photos: every answer is the map a direct
`sk.explain` gives (exactly: the app runs the same call on the same preprocessed photo; the maps
come back through the download zip, as saved npz), no request fails, and memory stays bounded.
Then the limits: an upload over the size limit gets 413 (with a length or sent in chunks without
one), a non-image 400, and a request beyond the queue 503 with Retry-After, while what was queued
still gets its own correct map. Figures (wall time, latency, memory) are written to
build/test-artifacts/app-load.json.
"""
import base64
import io
import json
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import data
from saliencykit.present.app import MAX_JOBS, App

from app_server import Running

ARTIFACTS = Path(os.environ.get("SK_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "build" / "test-artifacts"))
METHODS = ["saliency", "gradcam", "guided_backprop", "smoothgrad"]
CLIENTS, REQUESTS = 8, 25


class Loaded(Running):
    """The running app, with the calls a load test makes: submit and wait, and the maps of a job."""

    def explain(self, request: dict):
        code, answer = self.post(request)
        assert code == 200, answer
        return answer["job"], self.wait(answer["job"], timeout=300)

    def maps(self, job, method):
        with zipfile.ZipFile(io.BytesIO(self.get(f"/api/download/{job}.zip")[2])) as z:
            with np.load(io.BytesIO(z.read(f"{method}/maps.npz")), allow_pickle=False) as npz:
                return torch.from_numpy(npz["maps"])


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.slow
def test_eight_clients_times_25_requests_get_the_library_maps(tiny):
    photos = list(data.PHOTOS)
    direct = {(p, m): sk.explain(tiny, tiny.preprocess(data.image(p)), m, seed=0).maps
              for p in photos for m in METHODS}
    app = App(subjects={"tiny": tiny}, max_waiting=CLIENTS)  # every client has at most one request waiting
    latencies, wrong, errors, rss = [], [], [], []
    lock = threading.Lock()
    with Loaded(app) as server:
        server.explain({"model": "tiny", "photo": photos[0], "methods": ["saliency"]})  # warm up
        rss_before = _rss_mb()
        barrier = threading.Barrier(CLIENTS)

        def client(c):
            try:
                barrier.wait()
                for i in range(REQUESTS):
                    photo, method = photos[(c + i) % len(photos)], METHODS[(c * 3 + i) % len(METHODS)]
                    t0 = time.perf_counter()
                    job, status = server.explain({"model": "tiny", "photo": photo, "methods": [method]})
                    if status["state"] != "done":
                        errors.append(status)
                        continue
                    got = server.maps(job, method)
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        if len(latencies) == CLIENTS * REQUESTS // 2:
                            rss.append(_rss_mb())  # half way: the second half must not grow it much
                    if not torch.equal(got, direct[(photo, method)]):
                        wrong.append((c, i, photo, method))
            except BaseException as err:  # reported below, not lost in the thread
                errors.append(repr(err))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
        wall = time.perf_counter() - t0
        rss_after = _rss_mb()
        kept = len(app.jobs)
    figures = {"clients": CLIENTS, "requests_per_client": REQUESTS, "answers": len(latencies), "wall_s": round(wall, 2),
               "requests_per_s": round(len(latencies) / wall, 2),
               "latency_s": {"median": round(float(np.median(latencies)), 3) if latencies else None,
                             "p95": round(float(np.percentile(latencies, 95)), 3) if latencies else None,
                             "max": round(max(latencies), 3) if latencies else None},
               "rss_mb": {"before": round(rss_before), "half_way": round(rss[0]) if rss else None,
                          "after": round(rss_after)}, "jobs_kept": kept}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "app-load.json").write_text(json.dumps(figures, indent=2))
    print(figures)
    assert not errors, errors[:3]
    assert not wrong, wrong[:5]
    assert len(latencies) == CLIENTS * REQUESTS
    assert kept <= MAX_JOBS  # finished jobs are dropped beyond the limit: memory does not grow with requests
    # Bounded: the first half of the requests brings the process to its working size (a thread per job,
    # the allocator's per-thread arenas, 32 kept jobs with their photos: about 300 MB here); the second
    # half must not add more than a third of that. A job's tensors or photos kept per request would
    # (100 more requests of photos up to 512x512 and their results).
    assert rss_after - rss[0] < max(100.0, (rss[0] - rss_before) / 3)


class Slow(nn.Module):
    """The tiny CNN with a forward that takes 0.3 s: the app is busy long enough to be asked again."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        time.sleep(0.3)
        return self.net(x)


def _upload_of(size_bytes: int) -> bytes:
    return json.dumps({"model": "tiny", "methods": ["saliency"],
                       "upload": base64.b64encode(os.urandom(size_bytes)).decode()}).encode()


def test_limits_413_400_and_busy_503(tiny):
    slow = sk.Subject(Slow(tiny.model), input_size=(32, 32), name="slow")
    app = App(subjects={"tiny": tiny, "slow": slow}, max_upload_bytes=20_000, max_waiting=2)
    with Loaded(app) as server:
        # over the size limit: 413, with a Content-Length and in chunks without one
        code, _h, answer = server.post_with_headers(_upload_of(200_000))
        assert code == 413 and "limit" in answer["error"]
        chunks = iter([_upload_of(200_000)[i:i + 16_384] for i in range(0, 300_000, 16_384)])
        code, _h, answer = server.post_with_headers(chunks, headers={"Transfer-Encoding": "chunked"})
        assert code == 413 and "limit" in answer["error"]
        # not an image: 400 naming it
        code, answer = server.post({"model": "tiny", "methods": ["saliency"],
                                    "upload": base64.b64encode(b"GIF89a not really").decode()})
        assert code == 400 and "not an image" in answer["error"]
        # busy: two requests queue (one runs, one waits), the third gets 503 with Retry-After
        request = {"model": "slow", "photo": "chelsea", "methods": ["saliency"]}
        accepted = [server.post(request) for _ in range(2)]
        assert [a[0] for a in accepted] == [200, 200]
        code, headers, answer = server.post_with_headers(json.dumps(request).encode())
        assert code == 503 and "busy" in answer["error"]
        assert int(headers["Retry-After"]) >= 1
        # what was queued gets its own, correct map; then the app takes requests again
        expected = sk.explain(slow, slow.preprocess(data.image("chelsea")), "saliency", seed=0).maps
        for _code, a in accepted:
            status = server.wait(a["job"], timeout=300)
            assert status["state"] == "done"
            assert torch.equal(server.maps(a["job"], "saliency"), expected)
        job, status = server.explain(request)
        assert status["state"] == "done"
