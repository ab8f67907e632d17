"""The web app: HTTP-level checks on a tiny model, and an end-to-end run in a real headless
Chromium (Selenium driving /usr/bin/chromium) on the pretrained model."""
import base64
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliencykit import data, explain
from saliencykit.present.app import App

from app_server import Running
from saliencykit.present.verbalize import verbalize

ARTIFACTS = Path(os.environ.get("SK_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "build" / "test-artifacts"))


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def tiny_app(tiny):
    with Running(App(subjects={"tiny": tiny}, max_pixels=2_000_000)) as r:
        yield r


def test_explain_round_trip_matches_the_library(tiny_app, tiny):
    status, ctype, body = tiny_app.get("/api/options")
    opts = json.loads(body)
    assert opts["models"] == ["tiny"] and "gradcam" in opts["methods"] and "chelsea" in opts["photos"]
    assert "crp" not in opts["methods"]            # it needs a concept= the page cannot give
    status, ctype, page = tiny_app.get("/")
    assert ctype.startswith("text/html") and b"http://" not in page and b"https://" not in page  # works offline
    code, r = tiny_app.post({"photo": "chelsea", "model": "tiny", "methods": ["gradcam", "saliency"]})
    assert code == 200
    st = tiny_app.wait(r["job"])
    assert st["state"] == "done", st["message"]
    # progress counts the steps: prediction, one per method, the words
    assert st["progress"] == {"done": 4, "total": 4, "step": "done"}
    res = st["result"]
    # the page shows what the library computes on the same input
    x = tiny.preprocess(data.image("chelsea"))
    assert res["predictions"] == tiny.predict(x, k=5)[0]
    exps = explain(tiny, x, ["gradcam", "saliency"])
    assert res["words"] == verbalize(tiny, x, exps["gradcam"], compare=[exps["saliency"]]).text
    assert [o["method"] for o in res["overlays"]] == ["gradcam", "saliency"]
    for o in res["overlays"]:
        im = Image.open(io.BytesIO(base64.b64decode(o["image"].split(",", 1)[1])))
        assert im.size[0] == 320
    # downloaded maps are exactly the library's maps
    _, ctype, blob = tiny_app.get(f"/api/download/{r['job']}.zip")
    assert ctype == "application/zip"
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        names = set(z.namelist())
        assert {"gradcam/maps.npz", "gradcam/explanation.json", "gradcam/overlay.png", "saliency/maps.npz"} <= names
        with np.load(io.BytesIO(z.read("gradcam/maps.npz"))) as npz:
            assert np.array_equal(npz["maps"], exps["gradcam"].maps.numpy())


def test_metrics_on_request_are_evaluate_numbers(tiny_app, tiny):
    from saliencykit.metrics import evaluate

    code, r = tiny_app.post({"photo": "chelsea", "model": "tiny", "methods": ["gradcam", "saliency"], "metrics": True})
    st = tiny_app.wait(r["job"])
    assert st["state"] == "done", st["message"]
    m = st["result"]["metrics"]
    assert [c["name"] for c in m["columns"]] == ["deletion", "insertion"]
    assert [c["direction"] for c in m["columns"]] == ["lower", "higher"]
    # same maps, same seed, same step (32*32/16 = 64 pixels per point): the same numbers as evaluate()
    x = tiny.preprocess(data.image("chelsea"))
    exps = explain(tiny, x, ["gradcam", "saliency"])
    ev = evaluate(tiny, x, exps, metrics=["deletion", "insertion"], seed=0,
                  params={"deletion": {"step": 64}, "insertion": {"step": 64}})
    want = {row["method"]: [row["deletion"], row["insertion"]] for row in ev.summary()}
    got = {row["method"]: row["values"] for row in m["rows"]}
    assert set(got) == {"gradcam", "saliency", "random"}
    for name, vals in want.items():
        assert got[name] == pytest.approx(vals, abs=1e-9)


def test_targets_through_the_app(tiny_app, tiny):
    code, r = tiny_app.post({"photo": "coffee", "model": "tiny", "methods": ["gradcam"],
                             "target": {"kind": "contrast", "a": "c1", "b": "c3"}})
    st = tiny_app.wait(r["job"])
    assert st["state"] == "done" and "rather than *c3*" in st["result"]["words"]
    assert st["result"]["target"]["name"] == "c1 vs c3"
    code, r = tiny_app.post({"photo": "coffee", "model": "tiny", "methods": ["gradcam"],
                             "target": {"kind": "class", "a": "c4"}})
    assert tiny_app.wait(r["job"])["result"]["target"]["indices"] == [4]
    # an unknown class is a message in the page, not a trace
    code, r = tiny_app.post({"photo": "coffee", "model": "tiny", "methods": ["gradcam"],
                             "target": {"kind": "class", "a": "zebra"}})
    st = tiny_app.wait(r["job"])
    assert st["state"] == "error" and "zebra" in st["message"] and "Traceback" not in st["message"]


def test_bad_uploads_get_clear_messages(tiny):
    with Running(App(subjects={"tiny": tiny}, max_upload_bytes=200_000, max_pixels=250_000)) as app:
        req = {"model": "tiny", "methods": ["gradcam"]}
        code, r = app.post({**req, "upload": base64.b64encode(b"this is not a picture").decode()})
        assert code == 400 and "not an image" in r["error"]
        huge = Image.new("RGB", (600, 600), (10, 200, 30))  # 0.36 MP > the 0.25 MP limit, small file
        code, r = app.post({**req, "upload": _png(huge)})
        assert code == 400 and "megapixels" in r["error"] and "600x600" in r["error"]
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
        code, r = app.post({**req, "upload": _png(noise)})  # ~480 kB of PNG > 200 kB
        assert code in (400, 413) and "limit" in r["error"]
        code, r = app.post(None, raw=b"{not json")
        assert code == 400 and "JSON" in r["error"]
        code, r = app.post({**req, "photo": "chelsea", "methods": ["no_such_method"]})
        assert code == 400 and "unknown method" in r["error"]
        code, r = app.post({**req, "photo": "chelsea", "methods": []})
        assert code == 400 and "at least one method" in r["error"]
        gray = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1)), mode="L")
        code, r = app.post({**req, "upload": _png(gray), "upload_name": "gray.png"})
        st = app.wait(r["job"])
        assert st["state"] == "done" and "grayscale" in " ".join(st["result"]["notes"])
        for path in ("/api/job/nope", "/api/download/nope.zip", "/api/photo/nope"):
            with pytest.raises(urllib.error.HTTPError) as err:
                app.get(path)
            assert err.value.code == 404 and "error" in json.loads(err.value.read())


def _browser(width: int = 1400):
    """A headless Chromium driven by Selenium (window `width` px wide), or the reason none is available."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install selenium)"
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver_path)):
        return None, "Debian packages chromium and chromium-driver are not installed"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={width},1000"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=opts), None


def run_in_page(driver, app, photo, methods):
    """Open the app, pick `photo` and exactly `methods`, press Explain and wait for the results;
    returns the WebDriverWait used."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(app.base + "/")
    wait = WebDriverWait(driver, 120)
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, f"#photos button[data-photo={photo}]"))).click()
    for box in driver.find_elements(By.CSS_SELECTOR, "input[name=method]"):
        if box.is_selected() != (box.get_attribute("value") in methods):
            driver.execute_script("arguments[0].scrollIntoView();", box)
            box.click()
    driver.find_element(By.ID, "run").click()
    wait.until(EC.visibility_of_element_located((By.ID, "results")))
    return wait


def test_end_to_end_in_headless_chromium(lite0, tmp_path):
    driver, reason = _browser()
    if driver is None:
        pytest.skip(f"no browser for the end-to-end test: {reason}")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        with Running(App(subjects={"efficientnet_lite0": lite0})) as app:
            wait = run_in_page(driver, app, "chelsea", ("gradcam", "saliency"))
            # the predicted class shown is the model's top-1
            top = lite0.predict(lite0.preprocess(data.image("chelsea")), k=1)[0][0]["label"]
            assert driver.find_element(By.ID, "predicted-class").text == top == "Egyptian cat"
            figs = driver.find_elements(By.CSS_SELECTOR, "#overlays figure.overlay")
            assert [f.get_attribute("data-method") for f in figs] == ["gradcam", "saliency"]
            for f in figs:  # each overlay decoded and laid out by the browser
                img = f.find_element(By.TAG_NAME, "img")
                assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 320
            assert "Grad-CAM finds" in driver.find_element(By.ID, "words").text
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(ARTIFACTS / "app.png"))
            # a group target chosen in the page reaches the words
            from selenium.webdriver.support.ui import Select

            driver.find_element(By.CSS_SELECTOR, "input[name=target][value=group]").click()
            Select(driver.find_element(By.ID, "target-group")).select_by_value("cat")
            driver.find_element(By.ID, "run").click()
            wait.until(lambda d: "any kind of cat" in d.find_element(By.ID, "words").text
                       and d.find_element(By.ID, "results").is_displayed())
            # a bad upload: a message in the page, no stack trace
            bad = tmp_path / "notes.png"
            bad.write_text("not really a picture")
            driver.find_element(By.ID, "upload").send_keys(str(bad))
            time.sleep(0.5)  # FileReader finishes asynchronously
            driver.find_element(By.ID, "run").click()
            wait.until(EC.visibility_of_element_located((By.ID, "error")))
            msg = driver.find_element(By.ID, "error").text
            assert "not an image" in msg and "Traceback" not in msg
            driver.save_screenshot(str(ARTIFACTS / "app-bad-upload.png"))
    finally:
        driver.quit()


def test_serve_command_rejects_bad_arguments(capsys):
    from saliencykit.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--model", "no_such_model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_serve_command_serves_the_page():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "saliencykit", "serve", "--port", "0"], stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stderr.readline()  # "saliencykit app on http://127.0.0.1:PORT/ (Ctrl+C to stop)"
        url = line.split(" on ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/options", timeout=30) as r:
            opts = json.loads(r.read())
        assert opts["models"] == ["efficientnet_lite0", "mobilenet_v2"]
        with urllib.request.urlopen(url, timeout=30) as r:
            assert b"<title>saliencykit</title>" in r.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_transparent_upload_is_noted():
    # an upload with transparent pixels is composited on white: the page is told, an opaque one is not
    from saliencykit.present.app import decode_upload

    rgba = Image.new("RGBA", (32, 32), (200, 30, 30, 255))
    _, notes = decode_upload(_png(rgba))
    assert notes == []
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    img, notes = decode_upload(_png(rgba))
    assert img.mode == "RGB" and len(notes) == 1 and "transparent pixels" in notes[0]
