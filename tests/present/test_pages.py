"""What a person sees in a browser 1280 px wide: the report and the app, screenshotted, with no
text box overflowing its container (measured in the DOM) and a colour bar with its labels under
every map. Skipped, with the reason, when Chromium or Selenium is missing."""
import pytest

from saliencykit import Contrast
from saliencykit.present import report
from saliencykit.present.app import App

from test_app import ARTIFACTS, Running, _browser, run_in_page

WIDTH = 1280

# Every element that holds text directly, whose box sticks out of its nearest block container by
# more than a pixel, or whose own content is wider than its box; SVG text outside its SVG. A
# container that scrolls or clips on purpose (overflow not visible) is the boundary instead.
OVERFLOW_JS = """
const out = [];
const visible = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
for (const el of document.body.querySelectorAll('*')) {
  if (!visible(el) || el.closest('svg')) continue;
  const ownText = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
  if (!ownText) continue;
  const r = el.getBoundingClientRect();
  let box = el.parentElement;
  while (box && getComputedStyle(box).display.startsWith('inline')) box = box.parentElement;
  if (box) {
    const b = box.getBoundingClientRect();
    if (r.left < b.left - 1 || r.right > b.right + 1)
      out.push(el.tagName + ' "' + el.textContent.trim().slice(0, 40) + '" sticks out of ' + box.tagName);
  }
  const st = getComputedStyle(el);
  if (!st.display.startsWith('inline') && st.overflowX === 'visible' && el.scrollWidth > el.clientWidth + 1)
    out.push(el.tagName + ' "' + el.textContent.trim().slice(0, 40) + '" is wider than its box');
}
for (const t of document.querySelectorAll('svg text')) {
  const svg = t.ownerSVGElement.getBoundingClientRect(), r = t.getBoundingClientRect();
  if (t.textContent.trim() && (r.left < svg.left - 1 || r.right > svg.right + 1 || r.top < svg.top - 1 || r.bottom > svg.bottom + 1))
    out.push('svg text "' + t.textContent.trim() + '" is outside its figure');
}
if (document.documentElement.scrollWidth > window.innerWidth + 1) out.push('the page scrolls sideways');
return out;
"""

# every map image (the first img of a figure.overlay) has a colour bar image and labels under it
COLOUR_BARS_JS = """
return [...document.querySelectorAll('figure.overlay')].map((f) => {
  const bar = f.querySelector('.cbar img'), label = f.querySelector('.cbar .cbar-label');
  return [f.dataset.method, !!bar && bar.complete && bar.naturalWidth > 0, label ? label.textContent.trim() : ''];
});
"""


def _check(driver, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.execute_script("return window.innerWidth") <= WIDTH
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WIDTH, min(height + 140, 6000))  # the whole page in one screenshot
    assert driver.save_screenshot(str(ARTIFACTS / f"{name}-{WIDTH}.png"))
    problems = driver.execute_script(OVERFLOW_JS)
    assert problems == [], problems
    bars = driver.execute_script(COLOUR_BARS_JS)
    assert bars and all(ok and label for _, ok, label in bars), bars
    return bars


def test_report_at_1280_px(lite0, tmp_path):
    driver, reason = _browser(WIDTH)
    if driver is None:
        pytest.skip(f"no browser for the page test: {reason}")
    try:
        # a contrast with IG at few steps: negative curves, warnings, long words and the footer
        # tables are all on the page
        html = report.build(lite0, ["chelsea"], ["gradcam", "integrated_gradients", "rise"], metrics=["deletion"],
                            target=Contrast("tabby", vs="Egyptian cat"), seed=0,
                            params={"integrated_gradients": {"steps": 4}, "rise": {"n_masks": 200}},
                            metric_params={"deletion": {"step": 224 * 224 // 8}})
        path = report.write(tmp_path / "report.html", html)
        driver.get(path.as_uri())
        bars = _check(driver, "report")
        assert [b[0] for b in bars] == ["gradcam", "integrated_gradients", "rise"]
        assert dict((m, label) for m, _, label in bars)["integrated_gradients"].startswith("−max")
        page = driver.find_element("tag name", "body").text
        assert "p(tabby) − p(Egyptian cat)" in page and "more steps" in page
        assert "Shared colour scale" not in page
    finally:
        driver.quit()


def test_app_at_1280_px(lite0):
    driver, reason = _browser(WIDTH)
    if driver is None:
        pytest.skip(f"no browser for the page test: {reason}")
    from selenium.webdriver.common.by import By

    try:
        with Running(App(subjects={"efficientnet_lite0": lite0})) as app:
            run_in_page(driver, app, "astronaut", ("gradcam", "gradxinput"))
            bars = _check(driver, "app")
            assert [b[0] for b in bars] == ["gradcam", "gradxinput"]
            # astronaut's top answer has 14 %: the page says the model is unsure
            assert "the model is unsure" in driver.find_element(By.ID, "notes").text
    finally:
        driver.quit()
