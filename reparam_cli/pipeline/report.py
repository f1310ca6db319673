from torch import nn

from reparam_cli.convert.engine import ConversionReport
from reparam_cli.core.jsonio import replace_nonfinite
from reparam_cli.verification.equivalence import (FLOOR_FACTOR, LOW_PRECISION, PassFailed, VerifyResult, model_dtype,
                                                  overflow_message, run_model, tensor_leaves)


def finite_figures(report: dict) -> dict:
    """Replace every NaN/Inf float in `report` (nested dicts included) by None, in place, and name
    them in `nonfinite_values` ({"max_abs_err": "NaN", "worst_block.max_rel_err": "NaN", ...}), so
    the report is strict JSON and says why a figure is missing (`nonfinite` says where NaN/Inf
    appeared). Returns the report."""

    found: dict[str, str] = {}
    report.update(replace_nonfinite({k: v for k, v in report.items() if k != "nonfinite_values"}, found))
    if found:
        spelled = {"nan": "NaN", "inf": "Inf", "-inf": "-Inf"}
        report["nonfinite_values"] = {**(report.get("nonfinite_values") or {}),
                                      **{path: spelled[why] for path, why in found.items()}}
        report.setdefault("nonfinite", "non-finite figures: " + ", ".join(sorted(report["nonfinite_values"])))
    return report


def _verification_dict(result: VerifyResult | None) -> dict:
    if result is None:
        return {"verified": False}
    worst = result.worst_block()
    figures = {
        "verified": True, "ok": result.ok, "max_abs_err": result.max_abs_err, "max_rel_err": result.max_rel_err,
        "cosine": result.cosine, "train_rel_err": result.train_rel_err, "rtol": result.rtol, "atol": result.atol,
        "samples": result.samples, "input_shape": result.input_shape, "seed": result.seed,
        "worst_output": result.worst_output, "compute_dtype": result.compute_dtype,
        "worst_block": None if worst is None else {"path": worst.path, "type": worst.block_type,
                                                   "max_rel_err": worst.max_rel_err},
        "failed_blocks": [b.path for b in result.blocks if not b.ok],
    }
    if result.nonfinite:
        figures["nonfinite"] = result.nonfinite
    if result.weight_rounding_rel_err is not None:
        figures["weight_rounding_rel_err"] = result.weight_rounding_rel_err
    if result.overflow:
        figures["overflow"] = result.overflow
    if result.at_floor:
        figures["at_floor"] = True
    return finite_figures(figures)


def floor_notes(result: VerifyResult | None) -> list[str]:
    """The report's note when verification passed only by the float floor (equivalence.py's doc)."""
    if result is None or not result.at_floor:
        return []
    blocks = [b for b in result.blocks if b.floor is not None]
    where = []
    if result.train_rel_err > result.rtol:
        where.append(f"the training model itself, run in {result.compute_dtype}, is {result.train_rel_err:.2g} off "
                     f"its float64 reference (rtol {result.rtol:.2g}) and the deploy model {result.max_rel_err:.2g}")
    if blocks:
        b = max(blocks, key=lambda b: b.max_rel_err)
        where.append(f"{len(blocks)} block(s) likewise (worst {b.path}: {b.max_rel_err:.2g}, its training block "
                     f"{b.floor:.2g})")
    return [f"passed at the float floor: {'; '.join(where)}: within {FLOOR_FACTOR:g}x of what rounding alone gives "
            f"this model (its function jumps with rounding, e.g. a top-k or nearest-neighbour choice)"]


def _block_errors(result: VerifyResult | None) -> list[dict]:
    """Every verified block's figures, in model order (for --plot and --json)."""
    return [{"path": b.path, "type": b.block_type, "max_rel_err": b.max_rel_err, "ok": b.ok,
             **({"floor": b.floor} if b.floor is not None else {})}
            for b in (result.blocks if result else [])]


def _low_precision_notes(result: VerifyResult | None, train: nn.Module, deploy: nn.Module) -> list[str]:
    """The sentence for a float16/bfloat16 model whose activations overflow on N(0,1) inputs."""
    if result is None:
        return []
    low = next((d for d in (model_dtype(deploy), model_dtype(train)) if d in LOW_PRECISION), None)
    message = overflow_message(result, low) if low is not None else None
    return [message] if message else []


def checkpoint_overflow_notes(deploy: nn.Module, call, checkpoint_dtype, blocks=()) -> list[str]:
    """For a float16/bfloat16 checkpoint whose deploy model is wider (--dtype float32): the modules
    whose activations on the verification input `call` exceed the checkpoint dtype's range, so the
    model run in its own dtype would give inf there (a note, not a failure: this deploy model is
    fine). One forward pass with hooks; [] when nothing exceeds or the dtypes do not call for it."""
    import torch

    if checkpoint_dtype not in LOW_PRECISION or model_dtype(deploy) in LOW_PRECISION:
        return []
    limit = torch.finfo(checkpoint_dtype).max
    found: list[tuple[str, float]] = []  # (module path, peak) in the order their outputs appear

    def hook(path):
        def record(_m, _args, out):
            peaks = [leaf.detach().abs().max().item() for _, leaf in tensor_leaves(out)
                     if leaf.is_floating_point() and leaf.numel()]
            if peaks and max(peaks) > limit:
                found.append((path or "<root>", max(peaks)))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in deploy.named_modules()]
    try:
        run_model(deploy, call, "the deploy model's overflow check")
    except PassFailed:
        return []  # verification ran this model already: nothing to add
    finally:
        for h in handles:
            h.remove()
    if not found:
        return []
    name = str(checkpoint_dtype).removeprefix("torch.")
    first, peak = found[0]
    block = max((b for b in blocks if first == b or first.startswith(f"{b}.")), key=len, default=None)
    where = f"{first} (block {block})" if block and block != first else first
    more = [p for p, _ in found[1:] if not first.startswith(f"{p}.") and p != "<root>"]
    return [f"activations exceed {name}'s range ({limit:.6g}) on the verification input, first at {where}: "
            f"max |activation| {peak:.3g}" + (f", then at {len(more)} more modules ({', '.join(more[:3])}"
                                             f"{', ...' if len(more) > 3 else ''})" if more else "") +
            f"; this {str(model_dtype(deploy)).removeprefix('torch.')} deploy model is fine, the model run in "
            f"{name} (its checkpoint's dtype) gives inf there"]


def completeness_dict(conv_report: ConversionReport) -> dict:
    """The graph pass's part of a report: fused regions, what is left, and a one-line verdict."""
    return {
        "graph_regions": len(conv_report.regions),
        "regions": [{"path": r.path, "layer": r.layer, "before": r.before, "after": r.after}
                    for r in conv_report.regions],
        "remaining": [{"path": r.path, "kind": r.kind, "reason": r.reason} for r in conv_report.remaining],
        "kept": [{"path": r.path, "reason": r.reason} for r in conv_report.kept],
        # information, not left: untraceable modules holding nothing foldable, native methods that ran
        "skipped": [{"path": r.path, "kind": r.kind, "reason": r.reason} for r in conv_report.skipped],
        "completeness": conv_report.summary(),
    }


def _native_blocks(conv_report: ConversionReport) -> list[str]:
    """Block types converted by their own third-party method (family 'native'), for the report."""
    return sorted({b.block_type for b in conv_report.converted if b.family == "native"})
