"""`reparam quantize`: int8 readiness of a fused model, equalization, a verified int8 ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from reparam_cli.commands.common import (EmaOpt, JsonOpt, ShapeOpt, TrustOpt, TrustSpecOpt, fail, precheck,
                                         run_action, stderr_console)


SHORT_HELP = "int8 readiness: per-layer report, equalization, a verified int8 ONNX model."


def _floats(text: Optional[str], what: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        fail(f"{what} takes comma-separated numbers, got {text!r}", as_json=False)


def _db(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _tables(report: dict) -> None:
    from rich.table import Table

    if not report.get("layers"):  # a failure before the analysis: its error line says it all
        return
    console = stderr_console()
    eq = report.get("equalization") or {}
    layers = Table(title="int8 per layer: weight SQNR (dB) per tensor (W/T) and per channel (W/C), max/median "
                         "channel range ratio, input range, sens. = end-to-end SQNR (dB) with only this layer "
                         "quantized", title_justify="left")
    columns = ["layer", "W/T", "W/C"]  # weight SQNR per tensor / per channel
    if eq:
        columns += ["W/T eq", "W/C eq"]
    columns += ["ratio" + (" (->eq)" if eq else ""), "outliers", "input range", "sens."]
    for c in columns:
        layers.add_column(c, overflow="fold", justify="left" if c in ("layer", "outliers", "input range") else "right",
                          no_wrap=c != "layer")
    keep = set(report.get("keep_in_float") or [])
    for r in report["layers"]:
        cells = [r["path"] + (" [keep float]" if r["path"] in keep else ""),
                 f"{r['sqnr_per_tensor']:.1f}", f"{r['sqnr_per_channel']:.1f}"]
        if eq:
            cells += [_db(r.get("sqnr_per_tensor_equalized")), _db(r.get("sqnr_per_channel_equalized"))]
        outl = ",".join(map(str, r["outlier_channels"][:6])) + ("..." if r["outlier_count"] > 6 else "")
        rng = f"[{r['input_min']:.3g}, {r['input_max']:.3g}]" if "input_min" in r else "-"
        ratio = _db(r["range_ratio"]) + (f"->{_db(r.get('range_ratio_equalized'))}" if eq else "")
        cells += [ratio, outl or "-", rng,
                  f"{r['sensitivity_sqnr']:.1f}"]
        layers.add_row(*cells)
    console.print(layers)
    summary = Table(title=f"quantize: [{'green' if report['ok'] else 'red'}]{'OK' if report['ok'] else 'FAILED'}[/]",
                    show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    cal = report["calibration"]
    rows = [("input", report["input"]), ("spec", report.get("spec")),
            ("calibration", f"{cal['source']}: {cal['samples']} samples, {cal['held_out']} held out for the figures"),
            ("weights", report["granularity"])]
    if eq:
        rows.append(("equalization", f"{'applied' if eq.get('applied') else 'not applied'}: {len(eq['pairs'])} pairs, "
                     f"int8 SQNR {eq['sqnr_before']:.2f} -> {eq['sqnr_after']:.2f} dB, exact to "
                     f"{eq['exact']['max_rel_err']:.2g} rel" + (f" ({eq['reason']})" if eq.get("reason") else "")))
    rows += [("simulated int8 SQNR", f"{report['cumulative_sqnr']:.2f} dB (all layers)"),
             ("keep in float", f"{', '.join(report['keep_in_float']) or '-'} -> {report['sqnr_with_keep_in_float']:.2f} "
                               f"dB (target {report['target_sqnr']:g})")]
    if report.get("top1_agreement") is not None:
        rows.append(("top-1 agreement (simulated)", f"{report['top1_agreement']:.4f}"))
    if report.get("accuracy"):
        a = report["accuracy"]
        rows.append(("accuracy float / int8 / int8 + keep", f"{a['float']:.4f} / {a['int8']:.4f} / "
                                                           f"{a['int8_with_keep_in_float']:.4f}"))
    if "onnx_sqnr" in report:
        rows.append(("int8 ONNX (onnxruntime)", f"SQNR {report['onnx_sqnr']:.2f} dB (QDQ graph "
                     f"{report['onnx_qdq_sqnr']:.2f} dB)" + (f", top-1 agreement {report['onnx_top1_agreement']:.4f}"
                                                           if report.get("onnx_top1_agreement") is not None else "")))
    for key, label in (("output", "output"), ("keep_in_float_file", "keep-in-float list")):
        if report.get(key):
            rows.append((label, report[key]))
    for note in (report.get("notes") or []) + ([report["onnx_note"]] if report.get("onnx_note") else []):
        rows.append(("note", note))
    for label, value in rows:
        if value is not None:
            summary.add_row(label, str(value))
    console.print(summary)


def quantize(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Training checkpoint (with --spec) or a reparam "
                                      "deploy file (.safetensors written by convert)."),
    spec: Optional[str] = typer.Option(None, "--spec", "-s", metavar="SPEC", help="Model spec, as for convert "
                                       "(optional for a reparam deploy file: its stored spec is used)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE.onnx", help="Also write the int8 ONNX "
                                          "model (ONNX Runtime static quantization, QDQ), measured in onnxruntime."),
    calib: Optional[str] = typer.Option(None, "--calib", metavar="DIR|FILE", help="Calibration inputs: a folder of "
                                        "images, or a .npz/.npy array (N, C, H, W) [default: the spec's "
                                        "calibration_inputs() hook, else random N(0,1): indicative only]."),
    calib_samples: int = typer.Option(64, "--calib-samples", metavar="N", min=2, help="Calibration samples to use; "
                                      "the last quarter is held out to measure."),
    target_sqnr: float = typer.Option(30.0, "--target-sqnr", metavar="DB", help="End-to-end SQNR the keep-in-float "
                                      "list aims at."),
    min_sqnr: Optional[float] = typer.Option(None, "--min-sqnr", metavar="DB", help="Exit 1 (nothing written) when the "
                                             "int8 model (the ONNX file with -o, else the simulation) is worse."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="Quantize weights per tensor instead of per channel."),
    equalize: bool = typer.Option(True, "--equalize/--no-equalize", help="Cross-layer equalization (exact; kept only "
                                  "where it does not lower the int8 SQNR)."),
    method: str = typer.Option("minmax", "--calibrate-method", metavar="METHOD", help="ONNX Runtime calibration: "
                               "minmax, entropy or percentile."),
    reduce_range: bool = typer.Option(False, "--reduce-range", help="7-bit weights in the ONNX model (ONNX Runtime's "
                                      "remedy for CPUs without VNNI, whose integer kernels can saturate)."),
    keep_json: Optional[Path] = typer.Option(None, "--keep-in-float", metavar="FILE.json", help="Write the keep-in-"
                                             "float list (layer paths and ONNX node names) to this JSON file."),
    mean: Optional[str] = typer.Option(None, "--mean", metavar="M,M,M", help="Image normalisation mean for --calib DIR."),
    std: Optional[str] = typer.Option(None, "--std", metavar="S,S,S", help="Image normalisation std for --calib DIR."),
    input_shape: Optional[str] = ShapeOpt,
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the random calibration inputs (0 to 2**63-1).",
                             min=0, max=2**63 - 1),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    trust_pickle: bool = TrustOpt,
    trust_spec: bool = TrustSpecOpt,
    ema: bool = EmaOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Analyse a fused model for int8 and optionally write a verified int8 ONNX model.

    Per conv/linear layer: weight SQNR per tensor and per channel (before/after equalization),
    range ratio and outlier channels, input activation range, and sensitivity (end-to-end SQNR
    against the float64 reference with only that layer quantized); the cumulative SQNR; a
    keep-in-float list reaching --target-sqnr; top-1 agreement for classifiers (accuracy when the
    calibration file has labels). Tables go to stderr (--json: one JSON object on stdout).
    Exit 1 below --min-sqnr (nothing written), 2 on bad input.

    Examples:

    
      reparam quantize a0.pth --spec repvgg-a0
      reparam quantize a0.deploy.safetensors --calib images/ -o a0.int8.onnx --keep-in-float keep.json
      reparam quantize best.pth --spec digits.yaml --calib test.npz --min-sqnr 25 -o model.int8.onnx
    """
    if output is not None and str(output) == "-":
        fail("quantize writes its ONNX model to a file: -o - (stdout) is not supported", as_json)
    precheck(as_json, spec, (checkpoint,), (("onnx", "-o (int8 ONNX)"),) if output is not None else ())
    means, stds = _floats(mean, "--mean"), _floats(std, "--std")

    def action(progress):
        from reparam_cli.core.spec import parse_shape
        from reparam_cli.pipeline.quantization import quantize_checkpoint

        return quantize_checkpoint(
            checkpoint, spec, output, calib=calib, calib_samples=calib_samples, seed=seed,
            input_shape=parse_shape(input_shape) if input_shape else None, mean=means, std=stds,
            target_sqnr=target_sqnr, min_sqnr=min_sqnr, granularity="per-tensor" if per_tensor else "per-channel",
            equalize_=equalize, method=method, keep_json=keep_json, overwrite=overwrite, trust_pickle=trust_pickle,
            trust_spec=trust_spec, ema=ema, reduce_range=reduce_range, progress=progress)

    run_action(action, as_json, "quantize", show=_tables)
