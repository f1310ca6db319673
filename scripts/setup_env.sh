#!/usr/bin/env bash
# Create (or update) a virtual environment with reparam installed in editable mode.
# usage: scripts/setup_env.sh VENV_DIR [EXTRAS]
#   EXTRAS empty: the light CPU build of torch (enough to convert and verify).
#   EXTRAS "test,timm,onnx,...": torch + torchvision (timm needs it) and the named extras.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or the extras changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:?usage: setup_env.sh VENV_DIR [EXTRAS]}"
extras="${2:-}"
py="${PYTHON:-python3}"
stamp="$venv/.reparam-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) extras=$extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ -z "$extras" ]; then
    # The CPU build; a bare `torch` requirement would pull several GB of CUDA packages.
    "${pip[@]}" "torch==2.13.0"
    "${pip[@]}" -e .
else
    # torchvision (needed by timm) only imports beside this torch release.
    "${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
    "${pip[@]}" -e ".[$extras]"
fi
echo "$want" > "$stamp"
