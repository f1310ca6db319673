#!/usr/bin/env bash
# Set up .venv (CPU torch) and run the demo: a really trained network (examples/digits-repvgg.*,
# RepVGG blocks, 99% on handwritten digits) converted by `reparam convert`, then the training and
# deploy forms evaluated side by side on the held-out test images. Outputs go to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
out="${DEMO_DIR:-out/demo}"
mkdir -p "$out"
export PATH="$PWD/.venv/bin:$PATH"
ckpt=examples/digits-repvgg.safetensors
spec=examples/digits-repvgg.yaml
deploy="$out/digits-repvgg.deploy.safetensors"
echo "== 1/2 reparam convert: fuse every RepVGG block into one 3x3 conv, verify, write safetensors" >&2
reparam convert "$ckpt" --spec "$spec" -o "$deploy" --overwrite
echo "== 2/2 training form vs deploy form on the held-out test images (examples/digits-test.npz)" >&2
python scripts/demo.py --checkpoint "$ckpt" --spec "$spec" --deploy "$deploy" --json "$out/demo.json"
echo "figures written to $out/demo.json" >&2
