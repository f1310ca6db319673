"""Graph fusion on torchvision's ResNet-18: parameters, BatchNorms and batch-1 CPU latency before
and after `reparameterize` (recipes find nothing here; the graph pass folds every conv+BN).

    PYTHONPATH=. python scripts/graph_bench.py [--size 224] [--runs 30] [--threads 1]

Prints a small table; timings are medians over `runs` forward passes after 5 warm-up passes.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch import nn

from reparam_cli.core.tensors import count_parameters
from reparam_cli.convert.engine import reparameterize
from reparam_cli.core.tensors import randomize_batchnorm

from bench import forward_ms  # (scripts/ is on sys.path when this runs as a script)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        randomize_batchnorm(model, torch.Generator().manual_seed(0))
    model.eval()
    start = time.perf_counter()
    deploy, report = reparameterize(model)
    seconds = time.perf_counter() - start
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        ref, out = model.double()(x.double()), None
        model.float()
        out = deploy(x).double()
    err = ((out - ref).abs().max() / ref.abs().max()).item()

    def bns(m: nn.Module) -> int:
        return sum(isinstance(b, nn.modules.batchnorm._BatchNorm) for b in m.modules())

    rows = [("parameters", count_parameters(model), count_parameters(deploy)), ("BatchNorm layers", bns(model), bns(deploy)),
            (f"latency ms (batch 1, {args.size}px, {args.threads} thread)", forward_ms(model, x, args.runs, warmup=5),
             forward_ms(deploy, x, args.runs, warmup=5))]
    print(f"resnet18: {len(report.regions)} regions folded in {seconds:.2f} s, {report.summary()}, "
          f"max rel err {err:.2e}")
    print(f"{'':45} {'before':>12} {'after':>12}")
    for name, before, after in rows:
        fmt = "{:>12,.2f}" if isinstance(before, float) else "{:>12,}"
        print(f"{name:45} {fmt.format(before)} {fmt.format(after)}")


if __name__ == "__main__":
    main()
