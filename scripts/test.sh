#!/usr/bin/env bash
# Set up .venv-test (torch, every optional extra) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv-test "test,timm,onnx,plot,ultralytics,mmpretrain,torchvision,transformers"
# yapf (imported by mmengine) writes its grammar cache on first import: import it once here, so two
# test workers never race to write and read that cache on a new machine.
.venv-test/bin/python -c "import yapf" >/dev/null 2>&1 || true
exec .venv-test/bin/python -m pytest -n 2 "$@"
