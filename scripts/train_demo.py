"""Train the demo network (DigitsNet, RepVGG blocks) on scikit-learn's handwritten digits.

Writes into --out (default: examples/):

    digits-repvgg.safetensors   the training checkpoint (training form: 3 branches per block)
    digits-repvgg.yaml          its spec (builder reparam_cli.models.digits:DigitsNet)
    digits-test.npz             the held-out test split: images float32 (N, 1, 8, 8) in [0, 1],
                                labels int64 (N,), indices int64 (N,) into load_digits(),
                                so the demo needs no scikit-learn

Needs scikit-learn (bundled data set: no download). Deterministic: fixed seeds, deterministic
algorithms, one thread; on the same machine and torch build a re-run writes the same weights bit
for bit (the printed `weights_sha256`; the file's bytes differ only in the order of its metadata).
About 10 s of training on one core.

    python scripts/train_demo.py [--out examples] [--epochs 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from reparam_cli.models.digits import DigitsNet  # noqa: E402

NAME = "digits-repvgg"
ARCH = {"widths": [16, 32, 64], "depths": [2, 2], "in_channels": 1, "num_classes": 10}
TEST_FRACTION = 0.5

SPEC_YAML = """\
# The demo network: trained by scripts/train_demo.py on scikit-learn's handwritten digits.
name: {name}
description: DigitsNet (RepVGG blocks), 8x8 handwritten digits, {acc:.2%} test accuracy
family: repvgg
builder: reparam_cli.models.digits:DigitsNet
args:
  widths: {widths}
  depths: {depths}
  in_channels: {in_channels}
  num_classes: {num_classes}
input_shape: [1, 1, 8, 8]
"""


def load_split(seed: int) -> tuple[np.ndarray, ...]:
    """Digits as float32 (N, 1, 8, 8) in [0, 1] and int64 labels; stratified train/test split.

    Returns x_train, y_train, x_test, y_test, and the test samples' indices into load_digits()."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te, _, i_te = train_test_split(x, y, np.arange(len(y)), test_size=TEST_FRACTION,
                                                       stratify=y, random_state=seed)
    return x_tr, y_tr, x_te, y_te, i_te


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Augmentation: translate each image by -1..1 pixels in each direction (zero fill)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=g)
    dx = torch.randint(0, 3, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(n, 1, 8, 10)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(n, 1, 8, 8)
    return out.gather(3, cols)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    x_tr, y_tr, x_te, y_te, i_te = load_split(args.seed)
    x_tr, y_tr = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    x_te_t, y_te_t = torch.from_numpy(x_te), torch.from_numpy(y_te)

    model = DigitsNet(**ARCH)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = -(-len(x_tr) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=g)
        total = 0.0
        for i in range(0, len(x_tr), args.batch_size):
            idx = order[i:i + args.batch_size]
            xb = shift(x_tr[idx], g)
            loss = F.cross_entropy(model(xb), y_tr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {total / len(x_tr):.4f}  train acc {accuracy(model, x_tr, y_tr):.4f}",
                  file=sys.stderr)
    seconds = time.perf_counter() - start
    model.eval()
    test_acc = accuracy(model, x_te_t, y_te_t)
    print(f"test accuracy {test_acc:.4f} ({round(test_acc * len(y_te))}/{len(y_te)}), {seconds:.1f} s",
          file=sys.stderr)
    return {"model": model, "test_acc": test_acc, "seconds": seconds, "x_te": x_te, "y_te": y_te, "i_te": i_te,
            "n_train": len(x_tr)}


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def write(out: Path, result: dict, args: argparse.Namespace) -> None:
    import sklearn
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model = result["model"]
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": "pt", "description": "DigitsNet training checkpoint (scripts/train_demo.py)",
        "test_accuracy": f"{result['test_acc']:.6f}", "test_samples": str(len(result["y_te"])),
        "train_samples": str(result["n_train"]), "seed": str(args.seed), "epochs": str(args.epochs),
        "torch": torch.__version__, "sklearn": sklearn.__version__, "python": platform.python_version(),
    }
    ckpt = out / f"{NAME}.safetensors"
    save_file(state, str(ckpt), metadata=meta)
    ckpt.chmod(0o644)  # save_file creates it private; it is meant to be committed
    (out / f"{NAME}.yaml").write_text(SPEC_YAML.format(name=NAME, acc=result["test_acc"], **ARCH))
    np.savez_compressed(out / "digits-test.npz", images=result["x_te"], labels=result["y_te"],
                        indices=result["i_te"].astype(np.int64))
    print(json.dumps({"checkpoint": str(ckpt), "weights_sha256": weights_digest(state), "test_accuracy": result["test_acc"],
                      "train_seconds": round(result["seconds"], 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "examples", help="output folder [examples/]")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write(args.out, train(args), args)


if __name__ == "__main__":
    main()
