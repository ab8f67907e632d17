#!/usr/bin/env bash
# saliencykit beside Captum, pytorch-grad-cam and torchcam on a GPU, both models, in one short run
# (stopped at 8 minutes; an interrupted run keeps the sections it finished), written to
# benchmarks/results-gpu.md.
#
#     bash benchmarks/gpu.sh                       # on a machine with CUDA
#     bash benchmarks/gpu.sh --device cpu --quick  # the same script on a CPU, a few rows (a check,
#                                                  # written to benchmarks/_scratch/results-gpu-check.md)
#
# Installs nothing: it runs with the Python that has saliencykit and the anchors (the project's
# test extra: .venv/bin/python when there is one, else python); set PYTHON to choose another. Every library runs on the same device, interleaved
# in rotating order per row (benchmarks/compare.py); timings wait for the GPU (cuda.synchronize)
# before they stop. Rows: the single-pass and multi-pass gradient methods and the gradient CAMs at
# batch 1 and 8 on EfficientNet-Lite0 and resnet50 (random weights), Score-CAM on both, the
# metric rows against Quantus. Options after the script's own are passed to compare.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
DEVICE=cuda
QUICK=0
OUT=
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
# a check on a CPU never overwrites the GPU results
if [ -z "$OUT" ]; then
  if [ "$DEVICE" = cuda ]; then OUT=benchmarks/results-gpu.md; else mkdir -p benchmarks/_scratch; OUT=benchmarks/_scratch/results-gpu-check.md; fi
fi
if ! "$PYTHON" -c "import torch, saliencykit" 2>/dev/null; then
  echo "gpu.sh: $PYTHON cannot import torch and saliencykit; set PYTHON to the project's environment" >&2
  exit 2
fi
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: torch sees no CUDA device here; run it on a GPU machine or pass --device cpu" >&2
  exit 2
fi
if [ "$QUICK" = 1 ]; then
  # a check that the script and every code path run, not a measurement: two cheap rows, one repeat
  ROWS=(--models efficientnet_lite0 --batches 1 --methods saliency,gradcam --repeats 1
        --skip sharing --skip levers --skip metrics --skip memory)
else
  ROWS=(--methods saliency,gradxinput,guided_backprop,integrated_gradients,smoothgrad,gradcam,gradcam_pp,xgradcam,layercam,hirescam,eigencam,scorecam
        --resnet50-methods saliency,gradxinput,guided_backprop,integrated_gradients,smoothgrad,gradcam,gradcam_pp,layercam,eigencam,scorecam
        --batch8-methods saliency,gradxinput,integrated_gradients,smoothgrad,gradcam,layercam
        --repeats 5 --batch8-repeats 5 --heavy-anchors pytorch-grad-cam,torchcam
        --explain-calls 200 --skip levers)
fi
timeout 480 "$PYTHON" benchmarks/compare.py --device "$DEVICE" "${ROWS[@]}" "${EXTRA[@]}" --out "$OUT"
echo "wrote $OUT"
