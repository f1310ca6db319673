"""`reparam inspect`: what a checkpoint holds, and what converting it would do (nothing computed).

Safetensors files are read from their header alone; with a spec the model is built on the `meta`
device and converted shape-only, so inspecting even a big model is instant and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import extract_state_dict, load_into, read_raw
from .engine import count_parameters, reparameterize
from .errors import ReparamError
from .pipes import is_stdio, sniff_format, spooled_stdin
from .pipeline import Progress, _noop, _spec
from .spec import ModelSpec

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
}
# BatchNorm bookkeeping: buffers, not parameters (what `parameters` counts without a spec).
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _safetensors_header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: meta tensor of the stored shape and dtype}, raw metadata) from the header alone."""
    from .errors import CheckpointError

    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None) or {}
        tensors = {
            name: torch.empty(info["shape"], device="meta",
                              dtype=getattr(torch, _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"].lower())))
            for name, info in header.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: bad header ({type(exc).__name__})") from None
    return tensors, metadata


def _is_zip(path: Path) -> bool:
    """torch.save's zip format (mmap works for it; legacy pickles must be read)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def inspect_checkpoint(checkpoint: str | Path, spec: ModelSpec | str | None = None, *, trust_pickle: bool = False,
                       stdin=None, progress: Progress = _noop, trust_spec: bool = False) -> dict:
    """What a checkpoint holds (format told from its content, dtypes, tensor and parameter counts) and,
    with a spec, every re-parameterizable block (path, type, recipe family, parameters before/after).

    Nothing heavy is computed and nothing is written: safetensors are read from their header alone,
    the model is built on the `meta` device and converted shape-only. A reparam deploy file is
    recognised by its metadata; its stored spec is used when no spec is given, if it names a
    built-in or timm builder (any other builder only with `trust_spec`). `-` reads stdin.
    """
    from .errors import CheckpointError
    from .deploy import stored_spec
    from .metadata import decode_metadata, is_deploy_metadata

    if is_stdio(checkpoint):
        with spooled_stdin(stdin) as source:  # unnamed: nothing left in $TMPDIR, even after SIGKILL
            try:
                report = inspect_checkpoint(source, spec, trust_pickle=trust_pickle, progress=progress,
                                            trust_spec=trust_spec)
            except ReparamError as exc:
                exc.message = exc.message.replace(str(source), "<stdin>")
                raise
        return {**report, "input": "<stdin>"}
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" if not path.exists() else f"not a file: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        fmt = sniff_format(head)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc.message}", exc.hint) from None
    progress("reading checkpoint")
    reparam_meta: dict[str, Any] = {}
    if fmt == "safetensors":
        raw, header_meta = _safetensors_header(path)
        reparam_meta = decode_metadata(header_meta)
    else:
        raw = read_raw(path, trust_pickle, mmap=_is_zip(path))  # only shapes are needed: map, do not read
    deploy_file = is_deploy_metadata(reparam_meta)
    spec = _spec(spec) if spec is not None else None
    if spec is None and deploy_file:
        spec = stored_spec(reparam_meta, trust=trust_spec)
    ckpt = spec.checkpoint if spec is not None and not deploy_file else {}
    state = extract_state_dict(raw, ckpt.get("key"), ckpt.get("strip_prefix"), source=str(path))
    if spec is not None:
        progress("building the model on the meta device")
        train = spec.build(device="meta").eval()
        if not deploy_file and fmt == "torch":
            from .deploy import is_deploy_state

            # a plain state dict of the fused model (reference layout)?
            deploy_file = is_deploy_state(spec, state, training=train)
    dtypes: dict[str, int] = {}
    for t in state.values():
        name = str(t.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    report: dict[str, Any] = {
        "ok": True, "input": str(path), "format": fmt, "kind": "deploy" if deploy_file else "training",
        "size_bytes": path.stat().st_size, "tensors": len(state), "dtypes": dict(sorted(dtypes.items())),
        "parameters": sum(t.numel() for k, t in state.items() if not k.endswith(_BUFFER_SUFFIXES)),
        "elements": sum(t.numel() for t in state.values()),
    }
    if deploy_file:
        verification = reparam_meta.get("verification") or {}
        report["reparam"] = {
            "version": reparam_meta.get("version"), "source": reparam_meta.get("source"),
            "source_sha256": reparam_meta.get("source_sha256"),
            "verified": bool(verification.get("verified")), "max_rel_err": verification.get("max_rel_err"),
        }
    if spec is None:
        return report

    # Only shapes matter: meta tensors keep the fit check and the conversion free of real work.
    shapes = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in state.items()}
    if deploy_file:
        from .deploy import deploy_file_options

        deploy, conv = reparameterize(train, **deploy_file_options(path))
        load_into(deploy, shapes, what="deploy file")
    else:
        train = load_into(train, shapes)
        deploy, conv = reparameterize(train)
    from .pipeline import completeness_dict

    report.update({
        "spec": spec.name, "params_before": count_parameters(train), "params_after": count_parameters(deploy),
        **completeness_dict(conv),
        "blocks": conv.blocks,
        "block_list": [
            {"path": b.path, "type": b.block_type, "family": b.family,
             "params_before": count_parameters(train.get_submodule(b.path)),
             "params_after": count_parameters(deploy.get_submodule(b.path))}
            for b in conv.converted
        ],
    })
    return report
