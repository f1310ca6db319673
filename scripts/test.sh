#!/usr/bin/env bash
# Set up .venv-test (torch, every optional extra) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv-test "test,timm,onnx,plot,ultralytics,mmpretrain,torchvision,transformers"
exec .venv-test/bin/python -m pytest -n 2 "$@"
