"""Shared test helpers: random training models and the equivalence check used by block tests."""

from __future__ import annotations

import torch
from torch import nn

from reparam_cli.convert.engine import reparameterize
from reparam_cli.core.tensors import randomize_batchnorm


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """A training model in eval mode with random weights and BN statistics away from their defaults."""
    torch.manual_seed(seed)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            with torch.no_grad():
                p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
    with torch.no_grad():
        randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


def assert_equivalent(model: nn.Module, input_shape, rtol: float = 1e-5, dtype=torch.float32):
    """Convert `model` and check the deploy form on a random input, in float32 against float64.

    Returns (deploy model, report). The tolerance is relative to the output's magnitude: float32
    rounding gives ~1e-7, a wrong kernel or bias gives O(1).
    """
    model = model.to(dtype).eval()
    deploy, report = reparameterize(model)
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.double()(x.double())
        model.to(dtype)
        out = deploy(x.to(dtype)).double()
    err = (out - ref).abs().max().item() / ref.abs().max().item()
    assert err < rtol, f"relative error {err:.3g} >= {rtol}"
    return deploy, report


def run_cli(*args, stdin: bytes | None = None):
    """Invoke the `reparam` CLI in-process; the result has exit_code, stdout and stderr."""
    import inspect

    from typer.testing import CliRunner

    from reparam_cli.commands.app import app

    # click < 8.2 (under the oldest typer allowed) mixes stderr into stdout unless told not to
    separate = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters else {}
    return CliRunner(**separate).invoke(app, [str(a) for a in args], input=stdin)


# A tiny RepVGG (five RepVGGBlocks, 32x32 inputs): converts in well under a second.
TINY_REPVGG_YAML = """\
name: tiny-repvgg
builder: reparam_cli.blocks.repvgg:RepVGG
args: {num_blocks: [1, 1, 1, 1], width_multiplier: [0.25, 0.25, 0.25, 0.25], num_classes: 10}
input_shape: [1, 3, 32, 32]
"""


def spec_and_checkpoint(folder, yaml: str = TINY_REPVGG_YAML):
    """(spec file, training checkpoint with random weights) of the small model `yaml` describes, in `folder`."""
    from reparam_cli.pipeline.conversion import init_checkpoint

    spec = folder / "tiny.yaml"
    spec.write_text(yaml)
    init_checkpoint(str(spec), folder / "t.pth", seed=0)
    return spec, folder / "t.pth"


def restamp(src, dst, **spec_changes):
    """A copy of safetensors deploy file `src` at `dst` (same tensors) whose stored spec has
    `spec_changes` applied: how a crafted deploy file is made."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta["reparam.spec"] = json.dumps({**json.loads(meta["reparam.spec"]), **spec_changes})
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm layers (what a fused deploy model should have few of)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
