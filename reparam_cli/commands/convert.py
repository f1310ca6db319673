"""`reparam convert`: fuse, verify and write the deploy model of a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from reparam_cli.commands.common import (AllowNonfiniteOpt, AtolOpt, CONVERT_ROWS, DtypeOpt, DynamicShapesOpt, EmaOpt, FormatOpt,
                                         JsonOpt, LayoutOpt, LinearAsConvOpt, NoGraphOpt, NoVerifyOpt, RtolOpt, SamplesOpt,
                                         SeedOpt, ShapeOpt, SpecOpt, StrictOpt, TrustOpt, fail, precheck,
                                         refuse_json_on_stdout, run_action, verify_options)



SHORT_HELP = 'Fuse, verify and write the deploy model of a checkpoint.'


def convert(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Training checkpoint (.pth/.pt/.bin, Lightning .ckpt, .safetensors, a save_pretrained or Trainer checkpoint-N/ folder), "
                                                "or - for stdin."),
    spec: str = SpecOpt,
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE", help="Deploy file to write, or - for stdout [default: "
                                          "<input stem>.deploy.safetensors (.pt, .pt2, .onnx) beside the input]."),
    fmt: str = FormatOpt,
    dtype: Optional[str] = DtypeOpt,
    ema: bool = EmaOpt,
    no_verify: bool = NoVerifyOpt,
    rtol: Optional[float] = RtolOpt,
    atol: Optional[float] = AtolOpt,
    seed: int = SeedOpt,
    samples: int = SamplesOpt,
    input_shape: Optional[str] = ShapeOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    trust_pickle: bool = TrustOpt,
    allow_nonfinite: bool = AllowNonfiniteOpt,
    as_json: bool = JsonOpt,
    linear_as_conv: bool = LinearAsConvOpt,
    dynamic_shapes: str = DynamicShapesOpt,
    no_graph: bool = NoGraphOpt,
    layout: str = LayoutOpt,
    strict: bool = StrictOpt,
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png", help="Also draw the per-block errors against the tolerance "
                                        "to this PNG, even when verification fails (needs the plot extra)."),
    equalize: bool = typer.Option(False, "--equalize", help="Also apply exact cross-layer equalization (evens out "
                                  "per-channel weight ranges for int8; see `reparam quantize`)."),
    keep_unused: bool = typer.Option(False, "--keep-unused", help="Keep modules the deploy model's eval forward never "
                                     "calls (auxiliary heads); by default they are dropped from the file and named "
                                     "in the report."),
) -> None:
    """Fuse every re-parameterizable block, verify the result, and write the deploy model.

    The deploy file goes to -o (default: beside the input), or to stdout with -o -; `-` reads the
    checkpoint from stdin. A summary table goes to stderr (--json: one JSON object on stdout).
    Exit 1 when verification fails (nothing is written), 2 on bad input.

    Examples:

    
      reparam convert a0.pth --spec repvgg-a0
      reparam convert a0.pth --spec repvgg-a0 -f onnx -o a0.onnx
      reparam convert best.pth --spec 'repvgg-a0?num_classes=10'
      reparam convert a0.pth --spec repvgg-a0 --input-shape 1,3,64,64
      reparam convert tsl.pth --spec mobilenetv3-refconv-l --layout reference
      reparam convert last.pth.tar --spec timm:mobileone_s0 --ema --plot err.png
    """
    refuse_json_on_stdout(output, as_json)
    sink = sys.stdout.buffer  # the real stdout, for -o - (_guarded points sys.stdout at stderr)
    if plot is not None and no_verify:
        fail("--plot draws the verification's figures: it cannot be combined with --no-verify", as_json)
    precheck(as_json, spec, (checkpoint,), ((("onnx", "--format onnx"),) if fmt == "onnx" else ())
              + ((("plot", "--plot"),) if plot is not None else ()))

    def action(progress):
        import contextlib

        from reparam_cli.errors import VerificationFailed
        from reparam_cli.pipeline.options import ConvertOptions
        from reparam_cli.pipeline.stdio import convert_stdio, is_stdio, stdout_to_stderr

        options = ConvertOptions.of(fmt=fmt, verify=not no_verify,
                                    verify_options=verify_options(samples, seed, rtol, atol, input_shape),
                                    overwrite=overwrite, trust_pickle=trust_pickle, allow_nonfinite=allow_nonfinite, linear_as_conv=linear_as_conv,
                                    dtype=dtype, ema=ema, dynamic_shapes=dynamic_shapes, graph=not no_graph,
                                    layout=layout, strict=strict, equalize=equalize, keep_unused=keep_unused)
        # stdout is for the JSON report: no stray prints (with -o -, convert_stdio guards the file itself)
        with contextlib.nullcontext() if is_stdio(output) else stdout_to_stderr():
            try:
                report = convert_stdio(checkpoint, spec, output, options, stdout=sink, progress=progress)
            except VerificationFailed as exc:
                _write_plot(exc.report, plot)  # a failing block is what the plot is for
                raise
        _write_plot(report, plot)
        return report

    run_action(action, as_json, "convert", CONVERT_ROWS)


def _write_plot(report: dict, plot: Optional[Path]) -> None:
    if plot is not None:
        from reparam_cli.io.plot import write_plot

        report["plot"] = str(write_plot(report, plot))
