"""A real int8 model: the deploy model exported to ONNX (export.write_onnx) and quantized by ONNX
Runtime's static quantization (QDQ, int8 weights per channel, uint8 activations calibrated on
the calibration batches), keep-in-float layers excluded by node name; then run in onnxruntime on
the held-out batches and measured against the float64 reference.

ONNX Runtime writes temporaries (augmented calibration models); all of it happens in a private
temporary folder, removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from reparam_cli.core.machine import cpu_count
from reparam_cli.core.messages import quiet_logger
from reparam_cli.errors import OutputError, ReparamError
from reparam_cli.extras import import_extra
from reparam_cli.io.export import write_onnx
from reparam_cli.io.safeio import atomic_output, check_output_target
from reparam_cli.quantize.analysis import sqnr_db, top1_agreement

METHODS = ("minmax", "entropy", "percentile")


@contextlib.contextmanager
def private_tempdir() -> Iterator[Path]:
    """A fresh temporary folder that Python's tempfile (and so ONNX Runtime's tooling) uses meanwhile."""
    folder = Path(tempfile.mkdtemp(prefix="reparam-int8-"))
    old, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(folder), str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = old
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        shutil.rmtree(folder, ignore_errors=True)


def layer_nodes(onnx_path: Path, paths: Sequence[str]) -> dict[str, str]:
    """Layer path -> the name of the ONNX node (Conv, Gemm, MatMul) that reads its weight (the
    exporter names initializers by parameter path); layers not found are left out."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    by_weight = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            by_weight.setdefault(node.input[1], node.name)
    return {p: by_weight[f"{p}.weight"] for p in paths if f"{p}.weight" in by_weight}


def _session(path: Path, optimize: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:  # QDQ pairs run as float ops: the quantized model's semantics, not this CPU's kernels
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = min(4, cpu_count())
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, batches: Sequence[tuple], optimize: bool = True) -> list[Tensor]:
    """The ONNX model's outputs per batch (every output flattened and concatenated, float64).
    `optimize` False runs without graph optimizations (QDQ as float ops)."""
    session = _session(path, optimize)
    names = [i.name for i in session.get_inputs()]
    outs = []
    if _static_batch(session):  # exported with a fixed batch of one: feed samples one by one
        batches = _samples(batches)
    for batch in batches:
        feed = {n: b.detach().to(torch.float32).numpy() for n, b in zip(names, batch)}
        result = session.run(None, feed)
        outs.append(torch.cat([torch.from_numpy(r).reshape(r.shape[0], -1).to(torch.float64) for r in result], 1))
    return outs


def _static_batch(session) -> bool:
    dim = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    return isinstance(dim, int)


def _samples(batches: Sequence[tuple]) -> list[tuple]:
    return [tuple(b[i:i + 1] for b in batch) for batch in batches for i in range(batch[0].shape[0])]


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over the calibration batches."""

    def __init__(self, name: str, batches: Sequence[tuple]):
        self._items = iter([{name: b[0].detach().to(torch.float32).numpy()} for b in batches])

    def get_next(self):
        return next(self._items, None)


def quantize_onnx(deploy: nn.Module, calib: Sequence[tuple], held_out: Sequence[tuple], ref: Sequence[Tensor],
                  output: Path | None, *, keep_in_float: Sequence[str] = (), method: str = "minmax",
                  per_channel: bool = True, min_sqnr: float | None = None, overwrite: bool = False,
                  classifier: bool = False, reduce_range: bool = False) -> dict:
    """Export `deploy` (float32) to ONNX, quantize it statically (QDQ) leaving `keep_in_float` (layer
    paths) unquantized, measure it on `held_out` against `ref` (float64 outputs) and write it to
    `output` atomically (None: measure only). Below `min_sqnr` nothing is written and the report
    says so (`ok` False). `reduce_range`: 7-bit weights (ONNX Runtime's remedy for CPUs without
    VNNI, whose u8s8 integer kernels can saturate). Returns the figures: `onnx_sqnr` and
    `onnx_top1_agreement` as onnxruntime runs the file on this CPU (integer kernels), and
    `onnx_qdq_sqnr` as the QDQ graph defines it (graph optimizations off: what other runtimes
    compute from the same scales)."""

    if method not in METHODS:
        raise ReparamError(f"unknown calibration method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    if output is not None:
        check_output_target(Path(output), overwrite)
    q = import_extra("onnxruntime.quantization", "onnx", "an int8 ONNX model", OutputError)
    CalibrationMethod, QuantFormat, QuantType, quantize_static = (q.CalibrationMethod, q.QuantFormat, q.QuantType,
                                                                  q.quantize_static)
    deploy = deploy.to(torch.float32).eval()
    with private_tempdir() as tmp:
        float_path, int8_path = tmp / "float.onnx", tmp / "int8.onnx"
        write_onnx(float_path, deploy, calib[0][0][:1], dynamic="batch")
        paths = [p for p, m in deploy.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
        nodes = layer_nodes(float_path, paths)
        exclude = [nodes[p] for p in keep_in_float if p in nodes]
        calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                     "percentile": CalibrationMethod.Percentile}[method]
        import onnxruntime as ort

        session = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        calib = _samples(calib) if _static_batch(session) else calib
        try:
            with quiet_logger(""):  # its advice to pre-process goes to the root logger
                quantize_static(str(float_path), str(int8_path), _Reader(name, calib), quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, calibrate_method=calibrate, nodes_to_exclude=exclude,
                                reduce_range=reduce_range)
        except Exception as exc:
            raise OutputError(f"ONNX Runtime's static quantization failed: {type(exc).__name__}: "
                              f"{(str(exc).strip().splitlines() or [''])[0]}") from None
        outs = run_onnx(int8_path, held_out)
        qdq_outs = run_onnx(int8_path, held_out, optimize=False)
        float_outs = run_onnx(float_path, held_out)
        figures = {
            "ok": True, "onnx_sqnr": round(sqnr_db(torch.cat(list(ref)), torch.cat(outs)), 2),
            "onnx_qdq_sqnr": round(sqnr_db(torch.cat(list(ref)), torch.cat(qdq_outs)), 2),
            "onnx_float_sqnr": round(sqnr_db(torch.cat(list(ref)), torch.cat(float_outs)), 2),
            "onnx_top1_agreement": top1_agreement(outs, ref) if classifier else None,
            "onnx_excluded_nodes": exclude, "onnx_node_names": nodes, "calibrate_method": method,
            "onnx_per_channel": per_channel, "onnx_reduce_range": reduce_range, "held_out_samples": sum(b[0].shape[0] for b in held_out),
        }
        if figures["onnx_qdq_sqnr"] - figures["onnx_sqnr"] > 3.0:
            figures["onnx_note"] = (f"onnxruntime's integer kernels on this CPU reach {figures['onnx_sqnr']:.1f} dB where "
                                    f"the QDQ graph defines {figures['onnx_qdq_sqnr']:.1f} dB: on CPUs without VNNI "
                                    "their u8s8 products saturate; --reduce-range (7-bit weights) avoids it")
        if min_sqnr is not None and figures["onnx_sqnr"] < min_sqnr:
            figures["ok"] = False
            return figures
        if output is not None:
            with atomic_output(Path(output), overwrite) as out_tmp:
                shutil.copyfile(int8_path, out_tmp)
            figures["output"] = str(output)
    return figures
