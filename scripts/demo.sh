#!/usr/bin/env bash
# Set up .venv (CPU torch) and run the built-in example end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
out="${DEMO_DIR:-out/demo}"
mkdir -p "$out"
export PATH="$PWD/.venv/bin:$PATH"
echo "== reparam init: a RepVGG-A0 training checkpoint with random weights" >&2
reparam init repvgg-a0 -o "$out/repvgg-a0.pth" --overwrite
echo "== reparam convert: fuse, verify, write safetensors and TorchScript" >&2
reparam convert "$out/repvgg-a0.pth" --spec repvgg-a0 --overwrite
reparam convert "$out/repvgg-a0.pth" --spec repvgg-a0 --format torchscript --overwrite
echo "== reparam verify: the deploy files against the training checkpoint" >&2
reparam verify "$out/repvgg-a0.pth" "$out/repvgg-a0.deploy.safetensors" --spec repvgg-a0
reparam verify "$out/repvgg-a0.pth" "$out/repvgg-a0.deploy.pt" --spec repvgg-a0
