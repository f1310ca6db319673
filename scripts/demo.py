"""The demo's evaluation: a trained network before and after reparam convert, on real test images.

Loads the training checkpoint (training form: three branches per RepVGG block) and the deploy
file written by `reparam convert` (one 3x3 conv per block, rebuilt from the file alone), runs both
on the held-out digits test split and prints accuracy, how many predictions differ, the largest
logit difference, parameters, layers and batch-1 latency (median of repeated runs, one thread).

    python scripts/demo.py [--deploy out/demo/digits-repvgg.deploy.safetensors] [--repeats 300]
                           [--json out/demo/demo.json]

Needs only reparam's core dependencies (torch, numpy, rich, ...). `bash scripts/demo.sh` runs
the conversion and then this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from reparam_cli.core.tensors import count_parameters  # noqa: E402
from reparam_cli.errors import ReparamError  # noqa: E402
from reparam_cli.pipeline.deploy import load_deploy  # noqa: E402
from reparam_cli.pipeline.training import load_training_model  # noqa: E402
from reparam_cli.pipeline.specs import load_spec  # noqa: E402

EXAMPLES = ROOT / "examples"
CHECKPOINT = EXAMPLES / "digits-repvgg.safetensors"
SPEC = EXAMPLES / "digits-repvgg.yaml"
DATA = EXAMPLES / "digits-test.npz"
DEPLOY = ROOT / "out" / "demo" / "digits-repvgg.deploy.safetensors"


def load_test_split(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """images float32 (N, 1, 8, 8) in [0, 1], labels int64 (N,)."""
    with np.load(path, allow_pickle=False) as data:
        if not {"images", "labels"} <= set(data.files):
            raise ValueError(f"{path} has no 'images' and 'labels' arrays (it has: {', '.join(data.files) or 'none'})")
        return torch.from_numpy(data["images"]), torch.from_numpy(data["labels"])


def layer_counts(model: nn.Module) -> dict[str, int]:
    """Conv and BatchNorm layers: the work a forward pass dispatches."""
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return {"conv": convs, "batchnorm": bns}


@torch.inference_mode()
def latency_us(models: list[nn.Module], images: torch.Tensor, repeats: int, warmup: int = 30) -> list[list[float]]:
    """Batch-1 forward times in microseconds, `repeats` per model.

    The models take turns (alternating who goes first) on the same image, so drift in the machine's load hits them alike.
    """
    times: list[list[float]] = [[] for _ in models]
    for r in range(warmup + repeats):
        x = images[r % len(images)].unsqueeze(0)
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for m in order:
            start = time.perf_counter_ns()
            models[m](x)
            elapsed = (time.perf_counter_ns() - start) / 1e3
            if r >= warmup:
                times[m].append(elapsed)
    return times


@torch.inference_mode()
def evaluate(train: nn.Module, deploy: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             repeats: int = 300) -> dict:
    """Both forms on the whole test split, then batch-1 latency. Returns plain figures (JSON-able)
    plus `logits_train`, `logits_deploy` (N, classes) and `latency_us` lists for plotting."""
    train.eval()
    deploy.eval()
    lt, ld = train(images), deploy(images)
    pt, pd = lt.argmax(1), ld.argmax(1)
    wrong_t, wrong_d = (pt != labels).nonzero().flatten(), (pd != labels).nonzero().flatten()
    lat_t, lat_d = latency_us([train, deploy], images, repeats)
    n = len(labels)
    return {
        "test_samples": n,
        "accuracy_train": (pt == labels).sum().item() / n,
        "accuracy_deploy": (pd == labels).sum().item() / n,
        "correct_train": (pt == labels).sum().item(),
        "correct_deploy": (pd == labels).sum().item(),
        "predictions_differ": (pt != pd).sum().item(),
        "same_mistakes": torch.equal(wrong_t, wrong_d),
        "mistakes": wrong_t.tolist(),
        "max_logit_diff": (lt - ld).abs().max().item(),
        "max_abs_logit": lt.abs().max().item(),
        "params_train": count_parameters(train),
        "params_deploy": count_parameters(deploy),
        "layers_train": layer_counts(train),
        "layers_deploy": layer_counts(deploy),
        "latency_repeats": repeats,
        "latency_median_us_train": statistics.median(lat_t),
        "latency_median_us_deploy": statistics.median(lat_d),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "logits_train": lt, "logits_deploy": ld, "latency_us_train": lat_t, "latency_us_deploy": lat_d,
    }


def run(checkpoint: Path, spec: Path, deploy_path: Path, data: Path, repeats: int) -> dict:
    train = load_training_model(checkpoint, load_spec(str(spec)))
    deploy = load_deploy(deploy_path)  # the spec stored in the file: the deploy file stands alone
    images, labels = load_test_split(data)
    return evaluate(train, deploy, images, labels, repeats)


def print_report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    n = r["test_samples"]
    lt, ld = r["layers_train"], r["layers_deploy"]
    table = Table(title=f"digits test split: {n} images never seen in training", title_justify="left",
                  caption=f"latency: median of {r['latency_repeats']} batch-1 runs, {r['threads']} thread"
                          f"{'s' if r['threads'] != 1 else ''}, torch {r['torch']}", caption_justify="left")
    table.add_column("")
    table.add_column("training form", justify="right")
    table.add_column("deploy form", justify="right")
    table.add_column("", justify="right")
    table.add_row("accuracy", f"{r['accuracy_train']:.2%} ({r['correct_train']}/{n})",
                  f"{r['accuracy_deploy']:.2%} ({r['correct_deploy']}/{n})",
                  "identical" if r["correct_train"] == r["correct_deploy"] else "[red]differs[/]")
    table.add_row("parameters", f"{r['params_train']:,}", f"{r['params_deploy']:,}",
                  f"-{1 - r['params_deploy'] / r['params_train']:.1%}")
    table.add_row("conv / BN layers", f"{lt['conv']} / {lt['batchnorm']}", f"{ld['conv']} / {ld['batchnorm']}", "")
    speedup = r["latency_median_us_train"] / r["latency_median_us_deploy"]
    table.add_row("latency, batch 1", f"{r['latency_median_us_train']:.0f} µs", f"{r['latency_median_us_deploy']:.0f} µs",
                  f"{speedup:.2f}x faster")
    console = Console(highlight=False)
    console.print(table)
    ok = r["predictions_differ"] == 0
    console.print(f"predictions that differ: [{'green' if ok else 'red'}]{r['predictions_differ']} of {n}[/]")
    if r["same_mistakes"]:
        console.print(f"misclassified images: the same {len(r['mistakes'])} for both forms")
    console.print(f"largest logit difference: {r['max_logit_diff']:.2g} "
                  f"(logits up to {r['max_abs_logit']:.1f}: float32 rounding)")


def main() -> int:
    p = argparse.ArgumentParser(description="Evaluate the demo's training and deploy forms on the digits test split.")
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="training checkpoint [%(default)s]")
    p.add_argument("--spec", type=Path, default=SPEC, help="its YAML spec [%(default)s]")
    p.add_argument("--deploy", type=Path, default=DEPLOY, help="deploy file from `reparam convert` [%(default)s]")
    p.add_argument("--data", type=Path, default=DATA, help="test split (.npz: images, labels) [%(default)s]")
    p.add_argument("--repeats", type=int, default=300, help="timed batch-1 runs per model [%(default)s]")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 keeps the latency figures steady on a busy machine [%(default)s]")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if not args.deploy.is_file():
        print(f"error: deploy file not found: {args.deploy} (run `bash scripts/demo.sh`, or `reparam convert "
              f"{args.checkpoint} --spec {args.spec} -o {args.deploy}` first)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        result = run(args.checkpoint, args.spec, args.deploy, args.data, args.repeats)
    except (ReparamError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(result)
    if args.json:
        figures = {k: v for k, v in result.items() if not isinstance(v, (torch.Tensor, list)) or k == "mistakes"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if result["predictions_differ"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
