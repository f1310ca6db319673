"""`reparam verify`: check a deploy file against its training checkpoint (exit 1 if not equal)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from reparam_cli.commands.common import (AtolOpt, CONVERT_ROWS, EmaOpt, JsonOpt, RtolOpt, SamplesOpt, SeedOpt,
                                         ShapeOpt, SpecOpt, TrustOpt, precheck, run_action, verify_options)



SHORT_HELP = 'Check a deploy file against its training checkpoint (exit 1 if not equal).'


def verify(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Training checkpoint."),
    deployed: Path = typer.Argument(..., metavar="DEPLOYED", help="Deploy file: safetensors written by reparam, TorchScript (.pt), "
                                              "torch.export (.pt2) or ONNX (.onnx)."),
    spec: str = SpecOpt,
    rtol: Optional[float] = RtolOpt,
    atol: Optional[float] = AtolOpt,
    seed: int = SeedOpt,
    samples: int = SamplesOpt,
    input_shape: Optional[str] = ShapeOpt,
    trust_pickle: bool = TrustOpt,
    ema: bool = EmaOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Check that a deploy file computes the same function as a training checkpoint (exit 1 if not).

    The figures go to stderr as a table (--json: one JSON object on stdout); nothing is written.

    Examples:

    
      reparam verify a0.pth a0.deploy.safetensors --spec repvgg-a0
      reparam verify a0.pth a0.onnx --spec repvgg-a0 --json
    """
    precheck(as_json, spec, (checkpoint, deployed),
              (("onnx", "verifying an ONNX file"),) if deployed.suffix == ".onnx" else ())

    def action(progress):
        from reparam_cli.errors import VerificationFailed
        from reparam_cli.pipeline.conversion import verify_checkpoint

        report = verify_checkpoint(checkpoint, deployed, spec,
                                   verify_options=verify_options(samples, seed, rtol, atol, input_shape),
                                   trust_pickle=trust_pickle, progress=progress, ema=ema)
        if not report["ok"]:
            raise VerificationFailed("the deploy file does not match the training checkpoint", report)
        return report

    run_action(action, as_json, "verify", CONVERT_ROWS)
