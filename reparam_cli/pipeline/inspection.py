"""`reparam inspect`: what a checkpoint holds, and what converting it would do (nothing computed).

Safetensors files are read from their header alone; with a spec the model is built on the `meta`
device and converted shape-only, so inspecting even a big model is instant and writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reparam_cli.convert.engine import reparameterize
from reparam_cli.core.spec import ModelSpec
from reparam_cli.core.tensors import count_parameters
from reparam_cli.errors import CheckpointError, ReparamError
from reparam_cli.io.checkpoint import extract_state_dict, load_into, read_raw
from reparam_cli.io.metadata import decode_metadata, is_deploy_metadata
from reparam_cli.io.safetensors import read_header
from reparam_cli.io.sniff import sniff_format
from reparam_cli.pipeline.deploy import deploy_skeleton, is_deploy_state, stored_spec
from reparam_cli.pipeline.options import FuseOptions, Progress, no_progress
from reparam_cli.pipeline.report import completeness_dict
from reparam_cli.pipeline.specs import as_spec, training_branch_key
from reparam_cli.pipeline.stdio import is_stdio, spooled_stdin

# BatchNorm bookkeeping: buffers, not parameters (what `parameters` counts without a spec).
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _is_zip(path: Path) -> bool:
    """torch.save's zip format (mmap works for it; legacy pickles must be read)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def inspect_checkpoint(checkpoint: str | Path, spec: ModelSpec | str | None = None, *, trust_pickle: bool = False,
                       stdin=None, progress: Progress = no_progress, trust_spec: bool = False) -> dict:
    """What a checkpoint holds (format told from its content, dtypes, tensor and parameter counts) and,
    with a spec, every re-parameterizable block (path, type, recipe family, parameters before/after).

    Nothing heavy is computed and nothing is written: safetensors are read from their header alone,
    the model is built on the `meta` device and converted shape-only. A reparam deploy file is
    recognised by its metadata; its stored spec is used when no spec is given, if it names a
    built-in or timm builder (any other builder only with `trust_spec`). `-` reads stdin.
    """

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
        raw, header_meta = read_header(path)
        reparam_meta = decode_metadata(header_meta)
    else:
        raw = read_raw(path, trust_pickle, mmap=_is_zip(path))  # only shapes are needed: map, do not read
    reparam_file = is_deploy_metadata(reparam_meta)  # a deploy file written by reparam
    deploy_file = reparam_file
    spec = as_spec(spec) if spec is not None else None
    if spec is None and deploy_file:
        spec = stored_spec(reparam_meta, trust=trust_spec)
    ckpt = spec.checkpoint if spec is not None and not deploy_file else {}
    state = extract_state_dict(raw, ckpt.get("key"), ckpt.get("strip_prefix"), source=str(path))
    if spec is not None:
        progress("building the model on the meta device")
        train = spec.build(device="meta").eval()
        if not deploy_file:
            # a plain state dict (torch or safetensors) of the fused model, a reference layout?
            deploy_file = is_deploy_state(spec, state, training=train)
    dtypes: dict[str, int] = {}
    for t in state.values():
        name = str(t.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    kind = "deploy" if deploy_file else "training"
    branch = None if deploy_file or spec is not None else training_branch_key(state)
    if not deploy_file and spec is None and branch is None:
        kind = "deploy?"  # no reparam metadata, and no key of a training branch: told apart only with --spec
    report: dict[str, Any] = {
        "ok": True, "input": str(path), "format": fmt, "kind": kind,
        "size_bytes": path.stat().st_size, "tensors": len(state), "dtypes": dict(sorted(dtypes.items())),
        "parameters": sum(t.numel() for k, t in state.items() if not k.endswith(_BUFFER_SUFFIXES)),
        "elements": sum(t.numel() for t in state.values()),
    }
    if kind == "deploy?":
        report["kind_detail"] = ("deploy form (reference layout?): no key of a training branch and no reparam "
                                 "metadata; pass --spec to check it against the architecture")
    elif branch is not None:
        report["kind_detail"] = f"training form: {branch} is a training branch"
    if reparam_file:
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
    if deploy_file:  # reparam's own (fused as its metadata says) or a reference layout (as its keys fit)
        fuse = FuseOptions.from_stored(reparam_meta.get("options")) if reparam_file else None
        deploy, conv = deploy_skeleton(spec, fuse, state=shapes, training=train)
        load_into(deploy, shapes, what="deploy file")
        # As `convert` reports it: the layout asked for (reparam's files record it; a plain state dict is
        # named by the skeleton its keys fit), and whether the file has the reference layout.
        same = not conv.regions and not (fuse is not None and fuse.linear_as_conv)
        report["layout"] = fuse.layout if fuse is not None else ("reference" if same else "default")
        report["reference_layout"] = same
    else:
        train = load_into(train, shapes)
        deploy, conv = reparameterize(train)
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
