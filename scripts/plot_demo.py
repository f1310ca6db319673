"""Draw the demo figure (examples/demo.png): the trained digits network before and after reparam.

Converts the shipped checkpoint into a temporary folder (the normal convert_checkpoint path,
verified), evaluates both forms with scripts/demo.py's `evaluate` and draws three panels:
deploy-form logits against training-form logits on every test image, accuracy and parameters,
and the batch-1 latency distributions. Needs matplotlib (the `plot` extra).

    python scripts/plot_demo.py [-o examples/demo.png] [--repeats 500]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))
sys.path.insert(0, str(SCRIPTS))

import demo  # noqa: E402  (scripts/demo.py)

from reparam_cli.pipeline.conversion import convert_checkpoint  # noqa: E402

TRAIN_COLOR, DEPLOY_COLOR = "#9a9a9a", "#1f77b4"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def figures(repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        deploy = Path(tmp) / "digits-repvgg.deploy.safetensors"
        report = convert_checkpoint(demo.CHECKPOINT, str(demo.SPEC), deploy)
        return {**demo.run(demo.CHECKPOINT, demo.SPEC, deploy, demo.DATA, repeats), "blocks": report["blocks"]}


def draw(r: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(11, 3.4), gridspec_kw={"width_ratios": [1.1, 1, 1]})
    n = r["test_samples"]

    lt, ld = r["logits_train"].flatten().numpy(), r["logits_deploy"].flatten().numpy()
    lim = max(abs(lt).max(), abs(ld).max()) * 1.05
    ax0.plot([-lim, lim], [-lim, lim], color="#dddddd", lw=1, zorder=0)
    ax0.scatter(lt, ld, s=3, color=DEPLOY_COLOR, alpha=0.4, linewidths=0)
    ax0.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="training-form logit", ylabel="deploy-form logit",
            title=f"all {lt.size:,} logits of {n} test images")
    ax0.text(0.04, 0.96, f"predictions that differ: {r['predictions_differ']} of {n}\n"
                         f"largest logit difference: {r['max_logit_diff']:.1g}",
             transform=ax0.transAxes, va="top", fontsize=9)

    labels = ["training\nform", "deploy\nform"]
    params = [r["params_train"] / 1e3, r["params_deploy"] / 1e3]
    bars = ax1.bar(labels, params, color=[TRAIN_COLOR, DEPLOY_COLOR], width=0.6)
    for bar, acc, lay in zip(bars, (r["accuracy_train"], r["accuracy_deploy"]),
                             (r["layers_train"], r["layers_deploy"])):
        ax1.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + max(params) * 0.03,
                 f"{bar.get_height():.1f}k params\n{acc:.2%} accuracy\n{lay['conv']} conv, {lay['batchnorm']} BN",
                 ha="center", va="bottom", fontsize=9)
    ax1.set_ylim(0, max(params) * 1.45)
    ax1.set(ylabel="parameters (thousands)", title="same accuracy, fewer parameters")

    lat = [r["latency_us_train"], r["latency_us_deploy"]]
    box = ax2.boxplot(lat, tick_labels=labels, showfliers=False, widths=0.5, patch_artist=True,
                      medianprops={"color": "black"})
    for patch, color in zip(box["boxes"], (TRAIN_COLOR, DEPLOY_COLOR)):
        patch.set_facecolor(color)
    for i, key in enumerate(("latency_median_us_train", "latency_median_us_deploy"), start=1):
        ax2.text(i + 0.3, r[key], f"{r[key]:.0f} µs", va="center", fontsize=9)
    ax2.set_ylim(bottom=0)
    speedup = r["latency_median_us_train"] / r["latency_median_us_deploy"]
    ax2.set(ylabel="µs per image", title=f"batch-1 latency: {speedup:.1f}x faster")

    blocks = ", ".join(f"{v} {k}s" for k, v in r["blocks"].items())
    fig.suptitle(f"DigitsNet ({blocks}) trained on handwritten digits, before and after `reparam convert`",
                 fontsize=11)
    fig.text(0.99, 0.01, f"latency: {r['latency_repeats']} runs each, {r['threads']} thread, torch {r['torch']}, "
                         f"{cpu_name()}", ha="right", fontsize=7, color="#666666")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    print(f"wrote {output}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, default=SCRIPTS.parent / "examples" / "demo.png")
    p.add_argument("--repeats", type=int, default=500, help="timed batch-1 runs per model [%(default)s]")
    args = p.parse_args()
    torch.set_num_threads(1)
    draw(figures(args.repeats), args.output)


if __name__ == "__main__":
    main()
