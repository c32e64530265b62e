#!/usr/bin/env bash
# Creates .venv with the pinned PyTorch and this package (with its test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so no other package pulls a different build
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c "import torch, amodal; print('amodal', amodal.__version__, 'torch', torch.__version__)"
