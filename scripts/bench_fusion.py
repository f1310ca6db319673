"""Fusion arithmetic against one pass over the weights: `algebra.add` of a RepVGG block's branches
(3x3 conv+BN, 1x1 conv+BN, identity BN; float32 in, float32 out, summed in float64) for the blocks
of RepVGG-B3's largest stage (16 blocks of 768 channels), beside a plain `torch.add` of two tensors
of the 3x3 kernel's size (the floor: read two, write one). Prints medians of interleaved repeats.

    python scripts/bench_fusion.py [--repeats 7] [--channels 768] [--blocks 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reparam_cli.blocks.repvgg import RepVGGBlock  # noqa: E402
from reparam_cli.convert.engine import reparameterize  # noqa: E402
from reparam_cli.core.tensors import randomize_batchnorm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--blocks", type=int, default=16)
    args = parser.parse_args()
    c = args.channels
    with torch.no_grad():
        blocks = nn.Sequential(*[RepVGGBlock(c, c, 3, padding=1) for _ in range(args.blocks)]).eval()
        randomize_batchnorm(blocks, torch.Generator().manual_seed(0))
        a = torch.randn(args.blocks, c, c, 3, 3)
        b = torch.randn_like(a)
    fuse_times, add_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        deploy, _ = reparameterize(blocks, graph=False)
        fuse_times.append(time.perf_counter() - t0)
        del deploy
        t0 = time.perf_counter()
        torch.add(a, b)
        add_times.append(time.perf_counter() - t0)
    fuse, add = statistics.median(fuse_times), statistics.median(add_times)
    mb = a.numel() * 4 / 1e6
    print(f"{args.blocks} RepVGG blocks of {c} channels ({mb:.0f} MB of 3x3 weights), torch threads "
          f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    print(f"  reparameterize (recipes, float64 sums): {fuse * 1e3:8.1f} ms")
    print(f"  torch.add of two such tensors (floor):  {add * 1e3:8.1f} ms")
    print(f"  ratio: {fuse / add:.2f}x one pass over the weights")


if __name__ == "__main__":
    main()
