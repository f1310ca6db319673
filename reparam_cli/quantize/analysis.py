"""int8 readiness of a deploy model, simulated in float with torch's fake-quantize ops.

Conventions (those of TensorRT / ONNX Runtime's defaults):

- weights: symmetric int8 in [-127, 127], scale max|w| / 127, per tensor or per output channel
  (`torch.fake_quantize_per_tensor_affine` / `torch.fake_quantize_per_channel_affine`);
- activations: a layer's *input* quantized per tensor, asymmetric uint8 in [0, 255], its range the
  min/max seen on the calibration inputs (zero included), as a min/max calibrator does;
- SQNR (dB) = 10 log10(sum ref^2 / sum (ref - out)^2), every output tensor together, against the
  float64 reference (the deploy model run in float64); `EXACT_DB` stands for "no error at all".

Sensitivity of a layer is the end-to-end SQNR when only that layer is quantized; the cumulative
SQNR quantizes all of them. The keep-in-float list is built greedily: layers in order of
sensitivity (worst first) are left in float until the whole model reaches the target SQNR.
That is the fewest layers along that order, not a proven minimum over all subsets.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from reparam_cli.verification.equivalence import tensor_leaves

EXACT_DB = 150.0  # SQNR reported when the quantized output equals the reference exactly
OUTLIER_FACTOR = 4.0  # a channel whose max |w| exceeds this many times the median channel's is named
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
GRANULARITIES = ("per-channel", "per-tensor")

Batch = tuple  # positional inputs of one forward pass


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers of `model`, (path, module) in model order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LAYERS) and not getattr(m, "transposed", False)]


def sqnr_db(ref: Tensor, out: Tensor) -> float:
    """10 log10(|ref|^2 / |ref - out|^2) in float64; EXACT_DB when equal, -inf-free (0 signal: 0 dB)."""
    ref, out = ref.detach().to(torch.float64), out.detach().to(torch.float64)
    signal, noise = float((ref * ref).sum()), float(((ref - out) ** 2).sum())
    if noise == 0.0:
        return EXACT_DB
    if signal == 0.0 or not math.isfinite(noise):
        return 0.0 if math.isfinite(noise) else -EXACT_DB
    return min(EXACT_DB, 10.0 * math.log10(signal / noise))


def fake_quant_weight(w: Tensor, granularity: str = "per-channel") -> Tensor:
    """Symmetric int8 [-127, 127] of weight (out, ...): per output channel or per tensor (float32)."""
    w32 = w.detach().to(torch.float32)
    if granularity == "per-tensor":
        scale = max(float(w32.abs().max()), 1e-12) / 127.0
        return torch.fake_quantize_per_tensor_affine(w32, scale, 0, -127, 127)
    scale = (w32.abs().reshape(w32.shape[0], -1).amax(1) / 127.0).clamp_min(1e-12)
    zero = torch.zeros(w32.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w32, scale, zero, 0, -127, 127)


def fake_quant_activation(x: Tensor, lo: float, hi: float) -> Tensor:
    """Asymmetric uint8 [0, 255] of an activation calibrated to [lo, hi] (zero always representable)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255.0
    zero = int(min(255, max(0, round(-lo / scale))))
    return torch.fake_quantize_per_tensor_affine(x.to(torch.float32), scale, zero, 0, 255).to(x.dtype)


def weight_stats(w: Tensor) -> dict:
    """A layer's weight (out, ...) under int8: SQNR per tensor and per channel, the range ratio
    (max |w| over the median channel's max |w|) and the outlier channels (> OUTLIER_FACTOR x median)."""
    w32 = w.detach().to(torch.float32)
    per_channel = w32.abs().reshape(w32.shape[0], -1).amax(1)
    median = float(per_channel.median())
    ratio = float(per_channel.max()) / median if median > 0 else math.inf
    outliers = [int(i) for i in torch.nonzero(per_channel > OUTLIER_FACTOR * median).flatten()] if median > 0 else []
    return {"sqnr_per_tensor": round(sqnr_db(w32, fake_quant_weight(w32, "per-tensor")), 2),
            "sqnr_per_channel": round(sqnr_db(w32, fake_quant_weight(w32, "per-channel")), 2),
            "range_ratio": round(ratio, 2) if math.isfinite(ratio) else None,
            "outlier_channels": outliers[:16], "outlier_count": len(outliers)}


def run(model: nn.Module, batches: Sequence[Batch], dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """The model's outputs on each batch (every output tensor flattened and concatenated per batch)."""
    outs = []
    with torch.no_grad():
        for batch in batches:
            out = model(*[b.to(dtype) if b.is_floating_point() else b for b in batch])
            leaves = [t for _, t in tensor_leaves(out)]
            outs.append(torch.cat([t.reshape(t.shape[0], -1).to(torch.float64) if t.dim() else t.reshape(1, 1)
                                   for t in leaves], 1))
    return outs


def reference(model: nn.Module, batches: Sequence[Batch]) -> list[Tensor]:
    """The float64 reference outputs: a float64 copy of the deploy model on float64 inputs."""
    return run(copy.deepcopy(model).to(torch.float64), batches, torch.float64)


def activation_ranges(model: nn.Module, batches: Sequence[Batch]) -> dict[str, dict]:
    """Per layer: min/max of its input and of its output over the calibration batches (float32)."""
    ranges: dict[str, dict] = {}
    handles = []

    def hook(path):
        def record(_m, args, out):
            r = ranges.setdefault(path, {"input_min": math.inf, "input_max": -math.inf,
                                         "output_min": math.inf, "output_max": -math.inf})
            x = args[0].detach()
            r["input_min"], r["input_max"] = min(r["input_min"], float(x.min())), max(r["input_max"], float(x.max()))
            r["output_min"] = min(r["output_min"], float(out.min()))
            r["output_max"] = max(r["output_max"], float(out.max()))
        return record

    for path, layer in quantizable_layers(model):
        handles.append(layer.register_forward_hook(hook(path)))
    try:
        run(model, batches)
    finally:
        for h in handles:
            h.remove()
    return ranges


@contextlib.contextmanager
def simulated(model: nn.Module, paths: Sequence[str], ranges: dict[str, dict],
              granularity: str = "per-channel") -> Iterator[nn.Module]:
    """`model` with the layers at `paths` fake-quantized (weights, and input activations with their
    calibrated ranges); restored on exit."""
    saved, handles = [], []
    try:
        for path in paths:
            layer = model.get_submodule(path)
            saved.append((layer, layer.weight.data))
            layer.weight.data = fake_quant_weight(layer.weight.data, granularity).to(layer.weight.dtype)
            r = ranges.get(path)
            if r is not None:
                lo, hi = r["input_min"], r["input_max"]
                handles.append(layer.register_forward_pre_hook(
                    lambda _m, args, lo=lo, hi=hi: (fake_quant_activation(args[0], lo, hi), *args[1:])))
        yield model
    finally:
        for h in handles:
            h.remove()
        for layer, data in saved:
            layer.weight.data = data


def end_to_end_sqnr(model: nn.Module, batches: Sequence[Batch], ref: Sequence[Tensor], paths: Sequence[str],
                    ranges: dict[str, dict], granularity: str) -> tuple[float, list[Tensor]]:
    """SQNR (dB) of the model with `paths` fake-quantized against the float64 reference, and its outputs."""
    with simulated(model, paths, ranges, granularity):
        outs = run(model, batches)
    return sqnr_db(torch.cat(list(ref)), torch.cat(outs)), outs


def is_classifier(outputs: Sequence[Tensor], raw_output) -> bool:
    """One 2-D output with more than one column: logits."""
    leaves = tensor_leaves(raw_output)
    return len(leaves) == 1 and leaves[0][1].dim() == 2 and leaves[0][1].shape[1] > 1


def top1_agreement(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Fraction of samples whose argmax agrees."""
    x, y = torch.cat(list(a)).argmax(1), torch.cat(list(b)).argmax(1)
    return float((x == y).double().mean())


def accuracy(outs: Sequence[Tensor], labels: Tensor) -> float:
    return float((torch.cat(list(outs)).argmax(1) == labels).double().mean())


@dataclass
class Analysis:
    """The report of `analyse`, as a plain dict in `as_dict()`."""

    layers: list[dict]
    cumulative_sqnr: float
    keep_in_float: list[str]
    keep_steps: list[dict]
    reached: float
    target: float
    granularity: str
    classifier: bool
    agreement: float | None
    agreement_kept: float | None
    accuracy: dict | None
    outputs_quantized: list[Tensor]

    def as_dict(self) -> dict:
        return {"granularity": self.granularity, "cumulative_sqnr": round(self.cumulative_sqnr, 2),
                "target_sqnr": self.target, "keep_in_float": self.keep_in_float, "keep_steps": self.keep_steps,
                "sqnr_with_keep_in_float": round(self.reached, 2), "classifier": self.classifier,
                "top1_agreement": self.agreement, "top1_agreement_with_keep_in_float": self.agreement_kept,
                "accuracy": self.accuracy, "layers": self.layers}


def analyse(model: nn.Module, calib: Sequence[Batch], held_out: Sequence[Batch], *, granularity: str = "per-channel",
            target_sqnr: float = 30.0, labels: Tensor | None = None, ref: Sequence[Tensor] | None = None) -> Analysis:
    """The int8 analysis of a float32 deploy model: activation ranges calibrated on `calib`, every
    figure measured on `held_out` against the float64 reference (`ref`, computed if not given).
    `labels` (for the held-out samples) adds accuracies for classifiers."""
    model = model.eval()
    ref = list(ref) if ref is not None else reference(model, held_out)
    ranges = activation_ranges(model, calib)
    layers = quantizable_layers(model)
    rows = []
    for path, layer in layers:
        sens, _ = end_to_end_sqnr(model, held_out, ref, [path], ranges, granularity)
        rows.append({"path": path, "type": type(layer).__name__, "shape": list(layer.weight.shape),
                     **weight_stats(layer.weight), **{k: round(v, 4) for k, v in ranges.get(path, {}).items()},
                     "sensitivity_sqnr": round(sens, 2)})
    paths = [p for p, _ in layers]
    cumulative, outs = end_to_end_sqnr(model, held_out, ref, paths, ranges, granularity)
    keep: list[str] = []
    steps = []
    reached, kept_outs = cumulative, outs
    for row in sorted(rows, key=lambda r: r["sensitivity_sqnr"]):
        if reached >= target_sqnr:
            break
        keep.append(row["path"])
        reached, kept_outs = end_to_end_sqnr(model, held_out, ref, [p for p in paths if p not in keep], ranges,
                                             granularity)
        steps.append({"keep": row["path"], "sqnr": round(reached, 2)})
    with torch.no_grad():
        raw = model(*[b.to(torch.float32) if b.is_floating_point() else b for b in held_out[0]])
    classifier = is_classifier(ref, raw)
    agreement = top1_agreement(outs, ref) if classifier else None
    agreement_kept = top1_agreement(kept_outs, ref) if classifier else None
    acc = None
    if classifier and labels is not None:
        acc = {"float": accuracy(ref, labels), "int8": accuracy(outs, labels),
               "int8_with_keep_in_float": accuracy(kept_outs, labels)}
    return Analysis(rows, cumulative, keep, steps, reached, target_sqnr, granularity, classifier, agreement,
                    agreement_kept, acc, outs)
