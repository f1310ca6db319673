"""`reparam quantize` as a Python function: load (training checkpoint + spec, or a reparam deploy
file), fuse, optionally equalize (verified, kept only where it does not lower the int8 SQNR),
analyse, write the keep-in-float list and the int8 ONNX model. Returns the report dict.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from reparam_cli.convert.engine import reparameterize
from reparam_cli.core.jsonio import replace_nonfinite
from reparam_cli.errors import ReparamError, VerificationFailed
from reparam_cli.io.export import write_onnx
from reparam_cli.io.metadata import is_deploy_metadata
from reparam_cli.io.safeio import atomic_output, check_output_target
from reparam_cli.io.safetensors import read_metadata
from reparam_cli.io.sniff import looks_like_safetensors
from reparam_cli.pipeline.deploy import load_deploy, stored_spec
from reparam_cli.pipeline.options import Progress, no_progress
from reparam_cli.pipeline.specs import load_spec
from reparam_cli.pipeline.training import read_training_model
from reparam_cli.quantize.analysis import GRANULARITIES, analyse, quantizable_layers, reference
from reparam_cli.quantize.calibration import load_calibration
from reparam_cli.quantize.equalize import equalize
from reparam_cli.quantize.onnx_int8 import layer_nodes, private_tempdir, quantize_onnx
from reparam_cli.verification.equivalence import compare_models, tolerances


def load_fused(checkpoint: str | Path, spec_ref: str | None, *, trust_pickle: bool = False, trust_spec: bool = False,
               ema: bool = False) -> tuple[nn.Module, object, list[str]]:
    """(float deploy model, its spec, notes) from a reparam safetensors deploy file (its stored spec,
    or `spec_ref`) or from a training checkpoint with `spec_ref` (fused here, as `convert` does)."""

    path = Path(checkpoint)
    spec = load_spec(spec_ref) if spec_ref else None
    if path.is_file() and (path.suffix == ".safetensors" or looks_like_safetensors(path)):
        try:
            meta = read_metadata(path)
        except ReparamError:
            meta = {}
        if is_deploy_metadata(meta):
            model = load_deploy(path, spec, trust_spec=trust_spec)
            return model.eval(), spec or stored_spec(meta, trust=trust_spec), ["read as a reparam deploy file"]
    if spec is None:
        raise ReparamError(f"{path} is not a reparam deploy file, so its model needs --spec",
                           hint="pass --spec SPEC, as for `reparam convert`")
    train, ckpt = read_training_model(path, spec, trust_pickle=trust_pickle, ema=ema)
    deploy, report = reparameterize(train)
    return deploy.eval(), ckpt.rebuild_spec or spec, list(ckpt.notes) + [f"fused here: {report.summary()}"]


def _check_exact(equalized: nn.Module, original: nn.Module, batches: Sequence[tuple]) -> dict:
    """The equalized model against the original on `batches`, as a fold is verified: float32
    tolerances of verification.tolerances (rtol scaled by the output's magnitude)."""

    rtol, atol = tolerances(torch.float32)
    worst = {"max_abs_err": 0.0, "max_rel_err": 0.0, "ok": True, "rtol": rtol, "atol": atol}
    for batch in batches:
        c = compare_models(equalized, original, (tuple(b.to(torch.float32) for b in batch), {}), rtol, atol,
                           "the equalized model")
        worst["max_abs_err"] = max(worst["max_abs_err"], c.max_abs_err)
        worst["max_rel_err"] = max(worst["max_rel_err"], c.max_rel_err)
        worst["ok"] = worst["ok"] and c.ok
    return worst


def equalize_verified(model: nn.Module, calib: Sequence[tuple], check: Sequence[tuple]) -> tuple[nn.Module, dict]:
    """An equalized copy of `model` and the report (pairs, skipped layers, the exactness check).
    Raises VerificationFailed if the copy does not compute the same function at the float32 floor."""
    equalized = copy.deepcopy(model)
    report = equalize(equalized, calib[0]).as_dict()
    report["exact"] = _check_exact(equalized, model, check)
    if not report["exact"]["ok"]:
        raise VerificationFailed("the equalized model does not match the fused model (please report this)",
                                 {"ok": False, "equalization": report})
    return equalized, report


def quantize_checkpoint(checkpoint: str | Path, spec: str | None = None, output: str | Path | None = None, *,
                        calib: str | None = None, calib_samples: int = 64, seed: int = 0,
                        input_shape: Sequence[int] | None = None, mean=None, std=None,
                        target_sqnr: float = 30.0, min_sqnr: float | None = None, granularity: str = "per-channel",
                        equalize_: bool = True, method: str = "minmax", keep_json: str | Path | None = None,
                        overwrite: bool = False, trust_pickle: bool = False, trust_spec: bool = False,
                        ema: bool = False, reduce_range: bool = False, progress: Progress = no_progress) -> dict:
    """See the module doc and `reparam quantize --help`."""

    if granularity not in GRANULARITIES:
        raise ReparamError(f"unknown granularity {granularity!r}", hint=f"choose one of {', '.join(GRANULARITIES)}")
    for path in (output, keep_json):
        if path is not None:
            check_output_target(Path(path), overwrite)
    progress("loading the model")
    model, spec_, notes = load_fused(checkpoint, spec, trust_pickle=trust_pickle, trust_spec=trust_spec, ema=ema)
    model = model.to(torch.float32)
    shape = tuple(input_shape or spec_.input_shape)
    progress("reading calibration inputs")
    cal = load_calibration(calib, shape, calib_samples, seed=seed, spec=spec_, model=model, mean=mean, std=std)
    calib_b, held_b, labels = cal.split()
    progress("float64 reference")
    ref = reference(model, held_b)
    report: dict = {"ok": True, "input": str(checkpoint), "spec": getattr(spec_, "name", None),
                    "calibration": {"source": cal.source, "samples": int(cal.inputs.shape[0]),
                                    "held_out": sum(b[0].shape[0] for b in held_b), "note": cal.note},
                    "granularity": granularity, "target_sqnr": target_sqnr}
    progress("analysing")
    plain = analyse(model, calib_b, held_b, granularity=granularity, target_sqnr=target_sqnr, labels=labels, ref=ref)
    chosen, analysis = model, plain
    if equalize_:
        progress("equalizing")
        eq_model, eq = equalize_verified(model, calib_b, held_b)
        eq_analysis = analyse(eq_model, calib_b, held_b, granularity=granularity, target_sqnr=target_sqnr,
                              labels=labels, ref=ref)
        eq["sqnr_before"], eq["sqnr_after"] = round(plain.cumulative_sqnr, 2), round(eq_analysis.cumulative_sqnr, 2)
        if not eq["pairs"]:
            eq["applied"], eq["reason"] = False, "no conv/linear pair across a positively homogeneous activation"
        elif eq_analysis.cumulative_sqnr < plain.cumulative_sqnr:
            eq["applied"] = False
            eq["reason"] = (f"skipped: it would lower the int8 SQNR from {plain.cumulative_sqnr:.2f} to "
                            f"{eq_analysis.cumulative_sqnr:.2f} dB")
        else:
            eq["applied"] = True
            chosen, analysis = eq_model, eq_analysis
        after = {r["path"]: r for r in eq_analysis.layers}
        for row in plain.layers:
            a = after.get(row["path"], {})
            row["sqnr_per_tensor_equalized"] = a.get("sqnr_per_tensor")
            row["sqnr_per_channel_equalized"] = a.get("sqnr_per_channel")
            row["range_ratio_equalized"] = a.get("range_ratio")
        report["equalization"] = eq
    report.update({k: v for k, v in analysis.as_dict().items() if k != "layers"})
    report["layers"] = plain.layers if equalize_ else analysis.layers
    if analysis is not plain:  # equalized: sensitivities and activation ranges are those of the model used
        chosen_rows = {r["path"]: r for r in analysis.layers}
        for row in report["layers"]:
            row["sensitivity_sqnr_unequalized"] = row["sensitivity_sqnr"]
            row.update({k: v for k, v in chosen_rows[row["path"]].items()
                        if k == "sensitivity_sqnr" or k.startswith(("input_", "output_"))})
    report["cumulative_sqnr_unequalized"] = round(plain.cumulative_sqnr, 2)

    node_names: dict[str, str] = {}
    if output is not None:
        progress("quantizing with ONNX Runtime")

        figures = quantize_onnx(chosen, calib_b, held_b, ref, Path(output), keep_in_float=analysis.keep_in_float,
                                method=method, per_channel=granularity == "per-channel", min_sqnr=min_sqnr,
                                overwrite=overwrite, classifier=analysis.classifier,
                                reduce_range=reduce_range)
        node_names = figures.pop("onnx_node_names")
        report.update(figures)
        if not figures["ok"]:
            report["ok"] = False
            raise VerificationFailed(f"the int8 ONNX model reaches {figures['onnx_sqnr']:.2f} dB SQNR, below "
                                     f"--min-sqnr {min_sqnr:g}; nothing was written", replace_nonfinite(report, {}))
    elif min_sqnr is not None and analysis.cumulative_sqnr < min_sqnr:
        report["ok"] = False
        raise VerificationFailed(f"the simulated int8 model reaches {analysis.cumulative_sqnr:.2f} dB SQNR, below "
                                 f"--min-sqnr {min_sqnr:g}", replace_nonfinite(report, {}))
    if keep_json is not None:
        if not node_names:
            node_names = _node_names(chosen, calib_b)
        sens = {r["path"]: r["sensitivity_sqnr"] for r in analysis.layers}
        payload = {"target_sqnr": target_sqnr, "sqnr_with_keep_in_float": round(analysis.reached, 2),
                   "granularity": granularity, "equalized": bool(equalize_ and report["equalization"]["applied"]),
                   "keep_in_float": [{"path": p, "onnx_node": node_names.get(p), "sensitivity_sqnr": sens[p]}
                                     for p in analysis.keep_in_float]}
        with atomic_output(Path(keep_json), overwrite) as tmp:
            Path(tmp).write_text(json.dumps(payload, indent=2) + "\n")
        report["keep_in_float_file"] = str(keep_json)
    report["keep_in_float_nodes"] = {p: node_names.get(p) for p in analysis.keep_in_float} if node_names else None
    report["notes"] = notes + ([cal.note] if cal.note else [])
    return replace_nonfinite(report, {})


def _node_names(model: nn.Module, calib: Sequence[tuple]) -> dict[str, str]:
    """Layer path -> ONNX node name from a float export (empty without the onnx extra)."""
    try:
        with private_tempdir() as tmp:
            write_onnx(tmp / "float.onnx", model, calib[0][0][:1], dynamic="batch")
            return layer_nodes(tmp / "float.onnx", [p for p, _ in quantizable_layers(model)])
    except ReparamError:
        return {}
