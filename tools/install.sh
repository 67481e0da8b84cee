#!/usr/bin/env bash
# Install vqd_scale and its test extras into the current Python, torch pinned to the local CPU build.
# Idempotent: a second run only checks. Usage: bash tools/install.sh [extras, default "test"]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python -m pip install -q torch==2.13.0
# open_clip imports torchvision; the only torchvision for torch 2.13.0 is a CUDA build whose C ops
# do not load on CPU torch. We install it without deps; vqd_scale/compat.py registers the missing op
# schemas so `import open_clip` works (transforms only; no torchvision C op is used).
python -m pip install -q --no-deps torchvision==0.28.0
python -m pip install -q -c constraints.txt -e ".[${extras}]"
# The tests run the real img2dataset (tests/test_img2dataset_e2e.py). It pins webdataset<0.3 but only
# uses TarWriter, so it is installed without deps; setup.py's test extra lists its other requirements.
if [[ ",${extras}," == *",test,"* ]]; then python -m pip install -q --no-deps img2dataset==1.47.0; fi
python -c "import torch, vqd_scale; print('vqd_scale ready: torch', torch.__version__)"
