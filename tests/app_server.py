"""The web app running on a free loopback port for the app's tests: `with Running(App(...)) as r`."""
import json
import threading
import time
import urllib.error
import urllib.request

from saliencykit.present.app import make_server


class Running:
    def __init__(self, app):
        self.server = make_server(app, "127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=60) as r:
            return r.status, r.headers.get("Content-Type"), r.read()

    def post(self, body, raw=None):
        code, _headers, answer = self.post_with_headers(raw if raw is not None else json.dumps(body).encode())
        return code, answer

    def post_with_headers(self, data, headers=None):
        """(status, response headers, JSON answer) of a POST of the bytes (or iterable of chunks) `data`."""
        req = urllib.request.Request(self.base + "/api/explain", data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.headers, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, err.headers, json.loads(err.read())

    def wait(self, job, timeout=120):
        t0 = time.time()
        while time.time() - t0 < timeout:
            st = json.loads(self.get(f"/api/job/{job}")[2])
            if st["state"] != "running":
                return st
            time.sleep(0.1)
        raise AssertionError("job did not finish")
