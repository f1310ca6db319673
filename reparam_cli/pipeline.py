"""The pipeline behind the CLI: checkpoint -> state dict -> training model -> recipes -> deploy model
-> verification -> file. Each function returns a plain dict report (what `--json` prints).

    init_checkpoint(spec, output)                 random training checkpoint for trying things out
    convert_checkpoint(checkpoint, spec, ...)     fuse, verify, write
    verify_checkpoint(checkpoint, deployed, ...)  compare a training checkpoint with a deploy file

Pipes (`-` for stdin/stdout) live in pipes.py, `reparam inspect` in inspection.py, folders in batch.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ._version import __version__
from .checkpoint import (AlreadyDeployed, Checkpoint, extract_checkpoint, fit_problems, load_into, read_raw,
                         sha256_file)
from .engine import ConversionReport, count_parameters, reparameterize
from .errors import OutputError, ReparamError, VerificationFailed
from .metadata import is_deploy_metadata
from .deploy import (compare_exported, conversion_options, deploy_file_options, deploy_format_of,
                     load_deployed_any, read_metadata, stored_spec)
from .export import (DTYPES, FORMATS, SUFFIX, write_onnx, write_pt2, write_safetensors, write_state_safetensors,
                     write_torchscript)
from .spec import ModelSpec, load_spec
from .verify import VerifyResult, model_dtype, verify

Progress = Callable[[str], None]


def _noop(_: str) -> None:
    pass


@dataclass
class VerifyOptions:
    """How to verify: random batches of `input_shape` (default: the spec's), tolerances (default: per dtype)."""

    samples: int = 1
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    input_shape: tuple[int, ...] | None = None


def _spec(spec: ModelSpec | str) -> ModelSpec:
    return load_spec(spec) if isinstance(spec, str) else spec


def load_training_model(checkpoint: str | Path, spec: ModelSpec, trust_pickle: bool = False, *,
                        ema: bool = False) -> nn.Module:
    """Build the spec's training model on `meta` and assign the checkpoint's tensors (no random init)."""
    return read_training_model(checkpoint, spec, trust_pickle=trust_pickle, ema=ema)[0]


def _refuse_reparam_deploy_file(checkpoint: Path) -> None:
    """A safetensors file carrying reparam's deploy metadata is a deploy file, not a training checkpoint."""
    if checkpoint.suffix != ".safetensors" or not checkpoint.is_file():
        return
    try:
        meta = read_metadata(checkpoint)
    except ReparamError:
        return  # read_raw reports unreadable files
    if is_deploy_metadata(meta):
        name = stored_spec(meta).name
        raise AlreadyDeployed(f"{checkpoint} is already a reparam deploy file (spec {name})",
                              hint="nothing to convert; check it against its training checkpoint with `reparam verify`")


def read_training_model(checkpoint: str | Path, spec: ModelSpec, *, trust_pickle: bool = False,
                        ema: bool = False) -> tuple[nn.Module, Checkpoint]:
    """The spec's training model (built on `meta`, the checkpoint's tensors assigned) and the checkpoint.

    A checkpoint that is already in deploy form (a reparam deploy file, a TorchScript/pt2/ONNX
    file, or tensors that fit the fused model rather than the training one) raises AlreadyDeployed.
    """
    checkpoint = Path(checkpoint)
    _refuse_reparam_deploy_file(checkpoint)
    raw = read_raw(checkpoint, trust_pickle)
    key, strip = spec.checkpoint.get("key"), spec.checkpoint.get("strip_prefix")
    model = spec.build(device="meta")
    ckpt = extract_checkpoint(raw, key, strip, ema=ema, expected=model.state_dict().keys(), source=str(checkpoint))
    if fit_problems(model, ckpt.state):
        _refuse_deploy_form(raw, checkpoint, spec, ema)
    return load_into(model, ckpt.state).eval(), ckpt


def _refuse_deploy_form(raw, checkpoint: Path, spec: ModelSpec, ema: bool) -> None:
    """Raise AlreadyDeployed when the checkpoint's tensors fit the spec's deploy skeleton exactly."""
    skeleton, conv = reparameterize(spec.build(device="meta"))
    if not conv.converted:
        return
    try:
        deployed = extract_checkpoint(raw, spec.checkpoint.get("key"), spec.checkpoint.get("strip_prefix"), ema=ema,
                                      expected=skeleton.state_dict().keys(), source=str(checkpoint))
    except ReparamError:
        return
    if not fit_problems(skeleton, deployed.state):
        raise AlreadyDeployed(f"{checkpoint} is already in deploy form: its tensors fit the fused {spec.name} model, "
                              "not the training one", hint="nothing to convert; load it with load_deploy or "
                              "check it against its training checkpoint with `reparam verify`")


def output_dtype(dtype: str | None):
    """--dtype -> torch dtype (None: keep the checkpoint's)."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ReparamError(f"unknown dtype {dtype!r}", hint=f"choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_output(checkpoint: Path, fmt: str) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.deploy{SUFFIX[fmt]}")


def _check_output(checkpoint: Path, output: Path, overwrite: bool) -> None:
    if output.resolve() == checkpoint.resolve():
        raise OutputError(f"refusing to write the output over its input {checkpoint}", hint="pass another -o")
    if output.exists() and not overwrite:
        raise OutputError(f"output {output} already exists", hint="pass --overwrite to replace it")
    if output.is_dir():
        raise OutputError(f"output {output} is a directory")


def _verification_dict(result: VerifyResult | None) -> dict:
    if result is None:
        return {"verified": False}
    worst = result.worst_block()
    return {
        "verified": True, "ok": result.ok, "max_abs_err": result.max_abs_err, "max_rel_err": result.max_rel_err,
        "cosine": result.cosine, "train_rel_err": result.train_rel_err, "rtol": result.rtol, "atol": result.atol,
        "samples": result.samples, "input_shape": result.input_shape, "seed": result.seed,
        "worst_output": result.worst_output,
        "worst_block": None if worst is None else {"path": worst.path, "type": worst.block_type,
                                                   "max_rel_err": worst.max_rel_err},
        "failed_blocks": [b.path for b in result.blocks if not b.ok],
    }


def _run_verify(train: nn.Module, deploy: nn.Module, spec: ModelSpec, report: ConversionReport | None,
                opts: VerifyOptions) -> VerifyResult:
    blocks = [(b.path, b.block_type) for b in report.converted] if report else []
    shape = tuple(opts.input_shape or spec.input_shape)
    try:
        return verify(train, deploy, shape, blocks=blocks, samples=opts.samples,
                      seed=opts.seed, rtol=opts.rtol, atol=opts.atol)
    except RuntimeError as exc:  # almost always an input the model cannot take
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ReparamError(f"the training model cannot run on verification input {shape}: {detail}",
                           hint="pass --input-shape N,C,H,W that the model accepts") from None


def convert_checkpoint(
    checkpoint: str | Path,
    spec: ModelSpec | str,
    output: str | Path | None = None,
    *,
    fmt: str = "safetensors",
    verify_output: bool = True,
    verify_options: VerifyOptions | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    progress: Progress = _noop,
    linear_as_conv: bool = False,
    dtype: str | None = None,
    ema: bool = False,
) -> dict:
    """Convert a training checkpoint into a deploy file. Raises VerificationFailed (nothing written)
    when the fused model does not match, ReparamError on bad input.

    Blocks are fused in float64 and the deploy model is written in the checkpoint's dtype, or in
    `dtype` ('float32', 'float16', 'bfloat16'). `ema` picks a checkpoint's EMA weights. TorchScript,
    pt2 and ONNX outputs are loaded back with their runtime and compared with the deploy model
    before they are renamed into place (figures `export_*` in the report). `linear_as_conv` also
    turns nn.Linear layers into equivalent pointwise convs (recorded in the deploy file's metadata,
    so `load_deploy` rebuilds the same skeleton).
    """
    if fmt not in FORMATS:
        raise ReparamError(f"unknown format {fmt!r}", hint=f"choose one of {', '.join(FORMATS)}")
    out_dtype = output_dtype(dtype)
    checkpoint = Path(checkpoint)
    spec = _spec(spec)
    output = Path(output) if output else default_output(checkpoint, fmt)
    _check_output(checkpoint, output, overwrite)
    opts = verify_options or VerifyOptions()

    # The input's checksum (for the metadata) is computed on the other core while we fuse.
    hasher = ThreadPoolExecutor(max_workers=1)
    source_sha256 = hasher.submit(sha256_file, checkpoint) if fmt == "safetensors" else None
    hasher.shutdown(wait=False)
    progress("reading checkpoint")
    train, ckpt = read_training_model(checkpoint, spec, trust_pickle=trust_pickle, ema=ema)
    if fmt == "onnx" and verify_output and (out_dtype or ckpt.dtype) == torch.bfloat16:
        raise OutputError("onnxruntime cannot run bfloat16 convolutions on CPU, so a bfloat16 ONNX file cannot be "
                          "verified", hint="pass --dtype float16 or float32, or --no-verify")
    params_before = count_parameters(train)
    progress("fusing blocks")
    # Without verification the training model is not needed again: free each block once fused.
    deploy, conv_report = reparameterize(train, consume=not verify_output, **conversion_options(linear_as_conv))
    deploy.eval()
    if out_dtype is not None and out_dtype != ckpt.dtype:
        deploy = deploy.to(out_dtype)
    if not conv_report.converted:
        raise ReparamError(f"the model built from spec {spec.name!r} has no re-parameterizable blocks")
    result = None
    if verify_output:
        progress("verifying on random inputs")
        result = _run_verify(train, deploy, spec, conv_report, opts)
    report = {
        "ok": result.ok if result else True,
        "input": str(checkpoint), "output": str(output), "spec": spec.name, "format": fmt,
        "dtype": str(model_dtype(deploy)).removeprefix("torch."),
        "checkpoint_dtype": str(ckpt.dtype).removeprefix("torch."),
        "blocks": conv_report.blocks, "native_blocks": _native_blocks(conv_report),
        "params_before": params_before, "params_after": count_parameters(deploy),
        "flops_before": result.flops_train if result else None,
        "flops_after": result.flops_deploy if result else None,
        **_verification_dict(result),
    }
    if ckpt.notes or conv_report.notes:
        report["notes"] = list(ckpt.notes) + list(conv_report.notes)
    if result is not None and not result.ok:
        raise VerificationFailed("the deploy model does not match the training model; nothing was written", report)

    progress(f"writing {fmt}")
    metadata = {"version": __version__, "spec": spec.to_json(), "source": checkpoint.name,
                "blocks": conv_report.blocks, "dtype": report["dtype"], "verification": _verification_dict(result)}
    if source_sha256 is not None:
        metadata["source_sha256"] = source_sha256.result()
    if linear_as_conv:
        metadata["options"] = conversion_options(linear_as_conv)
    write_deploy(output, fmt, deploy, spec, opts, result, report, metadata=metadata)
    return report


def _native_blocks(conv_report: ConversionReport) -> list[str]:
    """Block types converted by their own third-party method (family 'native'), for the report."""
    return sorted({b.block_type for b in conv_report.converted if b.family == "native"})


def write_deploy(output: Path, fmt: str, deploy: nn.Module, spec: ModelSpec, opts: VerifyOptions,
                 result: VerifyResult | None, report: dict, metadata: dict) -> None:
    """Write `deploy` in `fmt` atomically. When verification ran, an exported file (TorchScript, pt2,
    ONNX) is first loaded back with its runtime and compared with the deploy model on the verification
    input: its figures go into `report`, and a mismatch raises VerificationFailed with nothing written."""
    if fmt == "safetensors":
        write_safetensors(output, deploy, metadata)
        return
    dtype = model_dtype(deploy)
    shape = tuple(opts.input_shape or spec.input_shape)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(opts.seed), dtype=torch.float64).to(dtype)

    def check(tmp: Path) -> None:
        figures = compare_exported(tmp, fmt, deploy, example, result.rtol, result.atol)
        report.update({f"export_{k}": v for k, v in figures.items()})
        if not figures["ok"]:
            report["ok"] = False
            raise VerificationFailed(f"the {fmt} file does not match the deploy model in {figures['runtime']}; "
                                     "nothing was written", report)

    writer = {"torchscript": write_torchscript, "pt2": write_pt2, "onnx": write_onnx}[fmt]
    writer(output, deploy, example, check=check if result is not None else None)


def verify_checkpoint(
    checkpoint: str | Path,
    deployed: str | Path,
    spec: ModelSpec | str,
    *,
    verify_options: VerifyOptions | None = None,
    trust_pickle: bool = False,
    progress: Progress = _noop,
    ema: bool = False,
) -> dict:
    """Compare a training checkpoint with a deploy file (reparam safetensors, TorchScript, pt2 or ONNX)."""
    spec = _spec(spec)
    opts = verify_options or VerifyOptions()
    progress("reading checkpoint")
    train, ckpt = read_training_model(checkpoint, spec, trust_pickle=trust_pickle, ema=ema)
    progress("reading deploy file")
    deploy = load_deployed_any(deployed, spec)
    fmt = deploy_format_of(deployed)
    # Per-block figures where the deploy file keeps the block structure (safetensors only);
    # which blocks were converted is read off a shape-only conversion.
    report = None
    if fmt == "safetensors":
        report = reparameterize(spec.build(device="meta"), **deploy_file_options(deployed))[1]
    progress("verifying on random inputs")
    result = _run_verify(train, deploy, spec, report, opts)
    out = {
        "ok": result.ok, "input": str(checkpoint), "output": str(deployed), "spec": spec.name, "format": fmt,
        "dtype": str(model_dtype(deploy)).removeprefix("torch."),
        "checkpoint_dtype": str(ckpt.dtype).removeprefix("torch."),
        "blocks": report.blocks if report else {},
        "params_before": count_parameters(train),
        "params_after": getattr(deploy, "num_parameters", None) or count_parameters(deploy),
        **_verification_dict(result),
    }
    if ckpt.notes:
        out["notes"] = list(ckpt.notes)
    return out


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Move every BatchNorm's statistics and affine parameters away from their defaults, so a fused
    model is tested on non-trivial BN folding (defaults make BN nearly the identity)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)


def init_checkpoint(spec: ModelSpec | str, output: str | Path, *, seed: int = 0, overwrite: bool = False) -> dict:
    """Write a training checkpoint with random weights and randomized BatchNorm statistics."""
    spec = _spec(spec)
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputError(f"output {output} already exists", hint="pass --overwrite to replace it")
    torch.manual_seed(seed)
    model = spec.build()
    with torch.no_grad():
        randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if output.suffix == ".safetensors":
        write_state_safetensors(output, state)
    else:
        from .export import atomic_output

        with atomic_output(output) as tmp:
            torch.save(state, tmp)
    return {"ok": True, "output": str(output), "spec": spec.name, "params": count_parameters(model),
            "tensors": len(state), "seed": seed}


def list_specs(params: bool = True) -> list[dict]:
    """Every built-in spec: name, family, description, input shape and, with `params`, the parameter
    counts before and after conversion (from shape-only builds on the meta device: no memory, no data).

    The family is the YAML's `family`, or else the families of the blocks a conversion finds. A spec
    that fails to build is listed with an `error` instead of stopping the listing.
    """
    import yaml

    from .spec import SPECS_DIR, builtin_names

    rows = []
    for name in builtin_names():
        row: dict = {"name": name}
        try:
            spec = load_spec(name)
            raw = yaml.safe_load((SPECS_DIR / f"{name}.yaml").read_text()) or {}
            row.update(family=raw.get("family"), description=spec.description,
                       input_shape=list(spec.input_shape), builder=spec.builder)
            if params or not row["family"]:
                model = spec.build(device="meta")
                deploy, report = reparameterize(model)
                if params:
                    row.update(params_before=count_parameters(model), params_after=count_parameters(deploy))
                row["family"] = row["family"] or ",".join(sorted({b.family for b in report.converted})) or None
        except ReparamError as exc:
            row["error"] = str(exc)
        except Exception as exc:  # a broken builder must not hide the other specs
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows
