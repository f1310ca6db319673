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
from .checkpoint import (AlreadyDeployed, Checkpoint, check_checkpoint_file, extract_checkpoint, find_module,
                         fit_problems, load_into, read_raw, sha256_file)
from .engine import ConversionReport, count_parameters, reparameterize
from .errors import CheckpointError, Incomplete, OutputError, ReparamError, VerificationFailed
from .metadata import is_deploy_metadata
from .deploy import (compare_exported, conversion_options, deploy_file_options, deploy_format_of,
                     load_deployed_any, read_metadata, stored_spec, stored_spec_data)
from .export import (DTYPES, DYNAMIC_SHAPES, FORMATS, SUFFIX, write_onnx, write_pt2, write_safetensors,
                     write_state_safetensors, write_torchscript)
from .spec import ModelSpec, is_checkpoint_spec, layout_hint, load_spec
from .verification import (LOW_PRECISION, PassFailed, VerifyResult, compare_models, make_call, model_dtype,
                     overflow_message, verify)

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
    from .checkpoint import _looks_like_safetensors

    # By content, not only by suffix: a checkpoint piped to stdin is read as /proc/self/fd/N.
    if not checkpoint.is_file() or not (checkpoint.suffix == ".safetensors" or _looks_like_safetensors(checkpoint)):
        return
    try:
        meta = read_metadata(checkpoint)
    except ReparamError:
        return  # read_raw reports unreadable files
    if is_deploy_metadata(meta):
        try:
            name = stored_spec_data(meta).name  # its name only: nothing stored is built here
        except ReparamError:
            name = "unreadable"
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
    if is_checkpoint_spec(spec):
        return _pickled_model(checkpoint, trust_pickle, ema)
    raw = read_raw(checkpoint, trust_pickle)
    key, strip = spec.checkpoint.get("key"), spec.checkpoint.get("strip_prefix")
    model = spec.build_meta()
    ckpt = extract_checkpoint(raw, key, strip, ema=ema, expected=model.state_dict().keys(), source=str(checkpoint))
    ckpt.notes.extend(n for n in spec.notes if n not in ckpt.notes)  # e.g. "built on cpu: ..."
    if fit_problems(model, ckpt.state):
        _refuse_deploy_form(raw, checkpoint, spec, ema)
    return load_into(model, ckpt.state, hint=lambda: layout_hint(ckpt.state, model, spec)).eval(), ckpt


def _pickled_model(checkpoint: Path, trust_pickle: bool, ema: bool) -> tuple[nn.Module, Checkpoint]:
    """`--spec checkpoint`: the nn.Module pickled in the checkpoint is the training model. A library
    that knows the model (see `ecosystems.adopt`) may prepare it and give a spec that rebuilds it."""
    from . import ecosystems

    if not trust_pickle:
        raise CheckpointError(f"--spec checkpoint uses the model pickled in {checkpoint}, and unpickling a model "
                              "runs code named in the file", hint="only if you trust its origin, pass --trust-pickle")
    module, wrappers, notes = find_module(read_raw(checkpoint, True), ema, str(checkpoint))
    module, rebuild, more = ecosystems.adopt(module)
    notes += more
    if rebuild is None:
        notes.append("a rebuild of a safetensors output needs the model's code: load_deploy(path, spec=...) with "
                     "its spec (TorchScript, pt2 and ONNX outputs are self-contained)")
    else:
        notes.append(f"the deploy file stores spec {rebuild.name} (the model's own configuration): "
                     "load_deploy rebuilds it from the file alone")
    state = module.state_dict()
    return module.eval(), Checkpoint(state, model_dtype(module), wrappers, "", notes, rebuild)


def _refuse_deploy_form(raw, checkpoint: Path, spec: ModelSpec, ema: bool) -> None:
    """Raise AlreadyDeployed when the checkpoint's tensors fit the spec's deploy skeleton exactly."""
    skeleton, conv = reparameterize(spec.build(device="meta").eval())
    if not conv.changed:
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
    from .safeio import check_output_target

    if output.resolve() == checkpoint.resolve():
        raise OutputError(f"refusing to write the output over its input {checkpoint}", hint="pass another -o")
    check_output_target(output, overwrite)  # no folder, FIFO or device; no existing file without --overwrite


def finite_figures(report: dict) -> dict:
    """Replace every NaN/Inf float in `report` (nested dicts included) by None, in place, and name
    them in `nonfinite_values` ({"max_abs_err": "NaN", "worst_block.max_rel_err": "NaN", ...}), so
    the report is strict JSON and says why a figure is missing (`nonfinite` says where NaN/Inf
    appeared). Returns the report."""
    from .jsonio import replace_nonfinite

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
    return finite_figures(figures)


def _shape(spec: ModelSpec, opts: VerifyOptions) -> tuple[int, ...]:
    return tuple(opts.input_shape or spec.input_shape)


def _pass_error(exc: PassFailed, shape: tuple[int, ...]) -> ReparamError:
    """A model that raised during verification, as one line: an input-shape problem of the training
    model asks for --input-shape; anything else names the pass that failed and its error."""
    if exc.shape_error and exc.stage.startswith("the training model's float64"):
        return ReparamError(f"the training model cannot run on verification input {shape}: {exc.detail}",
                            hint="pass --input-shape N,C,H,W that the model accepts")
    if exc.stage.startswith("the training model"):
        hint = "the model fails for a reason other than the input's shape; run it on such an input to see why"
    elif "input hook" in exc.stage:
        hint = "fix the spec's inputs hook"
    else:
        hint = "the training model runs but the fused one fails: please report this with the spec"
    return ReparamError(f"{exc.stage} failed on verification input {shape}: {exc.detail}", hint=hint)


def save_deploy(path: str | Path, deploy: nn.Module, spec: ModelSpec | str, result: VerifyResult | None = None) -> Path:
    """Write an in-memory deploy model (from `reparameterize`) as a reparam safetensors deploy file,
    atomically, with the spec (so `load_deploy(path)` rebuilds it) and `result`'s figures (from
    `verify`; None records it as not verified) in its metadata. Returns the path."""
    spec = _spec(spec)
    metadata = {"version": __version__, "spec": spec.to_json(), "source": "",
                "dtype": str(model_dtype(deploy)).removeprefix("torch."), "verification": _verification_dict(result)}
    write_safetensors(path, deploy, metadata)
    return Path(path)


def _block_errors(result: VerifyResult | None) -> list[dict]:
    """Every verified block's figures, in model order (for --plot and --json)."""
    return [{"path": b.path, "type": b.block_type, "max_rel_err": b.max_rel_err, "ok": b.ok}
            for b in (result.blocks if result else [])]


def _run_verify(train: nn.Module, deploy: nn.Module, spec: ModelSpec, report: ConversionReport | None,
                opts: VerifyOptions) -> VerifyResult:
    blocks = report.verify_blocks if report else []
    shape = _shape(spec, opts)
    try:
        return verify(train, deploy, shape, blocks=blocks, samples=opts.samples, seed=opts.seed,
                      rtol=opts.rtol, atol=opts.atol, make_inputs=spec.input_hook())
    except PassFailed as exc:
        raise _pass_error(exc, shape) from exc.exc


def _low_precision_notes(result: VerifyResult | None, train: nn.Module, deploy: nn.Module) -> list[str]:
    """The sentence for a float16/bfloat16 model whose activations overflow on N(0,1) inputs."""
    if result is None:
        return []
    low = next((d for d in (model_dtype(deploy), model_dtype(train)) if d in LOW_PRECISION), None)
    message = overflow_message(result, low) if low is not None else None
    return [message] if message else []


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
    dynamic_shapes: str = "auto",
    graph: bool = True,
    strict: bool = False,
    source_name: str | None = None,
) -> dict:
    """Convert a training checkpoint into a deploy file. Raises VerificationFailed (nothing written)
    when the fused model does not match, ReparamError on bad input.

    Blocks are fused in float64 and the deploy model is written in the checkpoint's dtype, or in
    `dtype` ('float32', 'float16', 'bfloat16'). `ema` picks a checkpoint's EMA weights. TorchScript,
    pt2 and ONNX outputs are loaded back with their runtime (safetensors with `load_deploy`) and
    compared with the deploy model before they are renamed into place (figures `export_*` in the
    report). `dynamic_shapes` (auto, batch, none): which dims of pt2/ONNX files may vary
    (`export_dynamic_dims` in the report). `linear_as_conv` also
    turns nn.Linear layers into equivalent pointwise convs (recorded in the deploy file's metadata,
    so `load_deploy` rebuilds the same skeleton).

    `graph` (default) also folds every linear region outside known blocks (`reparam_cli.graph`);
    the report lists them (`regions`) and what is left (`remaining`, `completeness`). `strict`
    makes anything left an error (Incomplete, exit 1, nothing written). A model in which nothing
    was converted or folded is written as it is (verified as usual) with the note "nothing to fold:
    N modules looked at"; with the graph pass off (`graph=False`) that raises ReparamError.
    """
    if fmt not in FORMATS:
        raise ReparamError(f"unknown format {fmt!r}", hint=f"choose one of {', '.join(FORMATS)}")
    if dynamic_shapes not in DYNAMIC_SHAPES:
        raise ReparamError(f"unknown --dynamic-shapes {dynamic_shapes!r}", hint=f"choose one of {', '.join(DYNAMIC_SHAPES)}")
    out_dtype = output_dtype(dtype)
    checkpoint = Path(checkpoint)
    spec = _spec(spec)
    output = Path(output) if output else default_output(checkpoint, fmt)
    _check_output(checkpoint, output, overwrite)
    opts = verify_options or VerifyOptions()

    # The input's checksum (for the metadata) is computed on the other core while we fuse, once its
    # first bytes show a checkpoint (a hash must not run away on /dev/zero or a huge sparse file).
    check_checkpoint_file(checkpoint)
    hasher = ThreadPoolExecutor(max_workers=1)
    source_sha256 = hasher.submit(sha256_file, checkpoint) if fmt == "safetensors" else None
    hasher.shutdown(wait=False)
    progress("reading checkpoint")
    train, ckpt = read_training_model(checkpoint, spec, trust_pickle=trust_pickle, ema=ema)
    named = spec.name
    spec = ckpt.rebuild_spec or spec  # --spec checkpoint: what rebuilds the model (input shape, deploy metadata)
    if fmt == "onnx" and verify_output and (out_dtype or ckpt.dtype) == torch.bfloat16:
        raise OutputError("onnxruntime cannot run bfloat16 convolutions on CPU, so a bfloat16 ONNX file cannot be "
                          "verified", hint="pass --dtype float16 or float32, or --no-verify")
    params_before = count_parameters(train)
    progress("fusing blocks")
    # Without verification the training model is not needed again: free each block once fused.
    options = conversion_options(linear_as_conv, graph)
    deploy, conv_report = reparameterize(train, consume=not verify_output, **options)
    deploy.eval()
    if out_dtype is not None and out_dtype != ckpt.dtype:
        deploy = deploy.to(out_dtype)
    if not conv_report.changed and not graph:
        raise ReparamError(f"the model built from spec {spec.name!r} has nothing to convert: no block with a recipe "
                           f"or a native method, and the graph pass is off ({conv_report.summary()})",
                           hint="drop --no-graph")
    if not conv_report.changed:  # nothing foldable is no error: the same function is written, verified as usual
        conv_report.notes.append(f"nothing to fold: {sum(1 for _ in train.modules())} modules looked at "
                                 f"({conv_report.summary()})")
    result = None
    if verify_output:
        progress("verifying on random inputs")
        result = _run_verify(train, deploy, spec, conv_report, opts)
    report = {
        "ok": result.ok if result else True,
        "input": str(checkpoint), "output": str(output), "spec": named, "format": fmt,
        "dtype": str(model_dtype(deploy)).removeprefix("torch."),
        "checkpoint_dtype": str(ckpt.dtype).removeprefix("torch."),
        "blocks": conv_report.blocks, "native_blocks": _native_blocks(conv_report),
        **completeness_dict(conv_report),
        "params_before": params_before, "params_after": count_parameters(deploy),
        "flops_before": result.flops_train if result else None,
        "flops_after": result.flops_deploy if result else None,
        **_verification_dict(result),
        "block_errors": _block_errors(result),
    }
    notes = list(ckpt.notes) + list(conv_report.notes) + _low_precision_notes(result, train, deploy)
    if notes:
        report["notes"] = notes
    finite_figures(report)
    if result is not None and not result.ok:
        why = f" ({result.nonfinite})" if result.nonfinite else ""
        raise VerificationFailed(f"the deploy model does not match the training model{why}; nothing was written",
                                 report)
    if strict and not conv_report.complete:
        report["ok"] = False
        raise Incomplete(f"--strict: {conv_report.summary()}; nothing was written", finite_figures(report))

    # The training model is not needed again: its blocks' tensors go before the file is loaded back.
    del train
    progress(f"writing {fmt}")
    metadata = {"version": __version__, "spec": spec.to_json(), "source": source_name or checkpoint.name,
                "blocks": conv_report.blocks, "dtype": report["dtype"], "verification": _verification_dict(result)}
    if source_sha256 is not None:
        metadata["source_sha256"] = source_sha256.result()
    metadata["options"] = options
    write_deploy(output, fmt, deploy, spec, opts, result, report, metadata=metadata, dynamic_shapes=dynamic_shapes,
                 overwrite=overwrite)
    return finite_figures(report)


def completeness_dict(conv_report: ConversionReport) -> dict:
    """The graph pass's part of a report: fused regions, what is left, and a one-line verdict."""
    return {
        "graph_regions": len(conv_report.regions),
        "regions": [{"path": r.path, "layer": r.layer, "before": r.before, "after": r.after}
                    for r in conv_report.regions],
        "remaining": [{"path": r.path, "kind": r.kind, "reason": r.reason} for r in conv_report.remaining],
        "kept": [{"path": r.path, "reason": r.reason} for r in conv_report.kept],
        "completeness": conv_report.summary(),
    }


def _native_blocks(conv_report: ConversionReport) -> list[str]:
    """Block types converted by their own third-party method (family 'native'), for the report."""
    return sorted({b.block_type for b in conv_report.converted if b.family == "native"})


def write_deploy(output: Path, fmt: str, deploy: nn.Module, spec: ModelSpec, opts: VerifyOptions,
                 result: VerifyResult | None, report: dict, metadata: dict, dynamic_shapes: str = "auto",
                 overwrite: bool = False) -> None:
    """Write `deploy` in `fmt` atomically. When verification ran, the written file is first loaded back
    the way a user loads it (`load_deploy` for safetensors, its runtime for TorchScript, pt2 and ONNX)
    and compared with the deploy model on the verification input: its figures go into `report`
    (`export_*`), and a mismatch raises VerificationFailed with nothing written."""
    dtype = model_dtype(deploy)
    try:
        call64 = make_call(spec.input_hook(), _shape(spec, opts), torch.Generator().manual_seed(opts.seed))
    except PassFailed as exc:
        raise _pass_error(exc, _shape(spec, opts)) from exc.exc

    def failed(figures: dict, where: str) -> None:
        report.update({f"export_{k}": v for k, v in figures.items()})
        finite_figures(report)
        if not figures["ok"]:
            report["ok"] = False
            overflow = _low_precision_notes(result, deploy, deploy)
            where += f" ({overflow[0]})" if overflow and fmt != "safetensors" else ""
            raise VerificationFailed(f"the {fmt} file does not match the deploy model {where}; nothing was written",
                                     report)

    if fmt == "safetensors":
        def check_safetensors(tmp: Path) -> None:
            from .deploy import load_deploy

            loaded = load_deploy(tmp, spec)
            try:
                c = compare_models(loaded, deploy, call64, result.rtol, result.atol, "the deploy file loaded back")
            except PassFailed as exc:
                raise _pass_error(exc, _shape(spec, opts)) from exc.exc
            figures = {"runtime": "load_deploy", "max_abs_err": c.max_abs_err, "max_rel_err": c.max_rel_err,
                       "ok": c.ok}
            if c.nonfinite:
                figures["nonfinite"] = c.nonfinite
            failed(figures, "when loaded back with load_deploy")

        write_safetensors(output, deploy, metadata, check=check_safetensors if result is not None else None,
                          overwrite=overwrite)
        return
    from .verification import cast_floating

    args, kwargs = cast_floating(call64, dtype)
    if kwargs:
        raise OutputError(f"the spec's input hook passes keyword arguments, which a {fmt} file cannot take",
                          hint="write safetensors, or make the hook return positional arguments")
    example = args[0] if len(args) == 1 else tuple(args)

    def check(tmp: Path) -> None:
        failed(compare_exported(tmp, fmt, deploy, example, result.rtol, result.atol), "in its runtime")

    checker = check if result is not None else None
    if fmt == "torchscript":
        write_torchscript(output, deploy, example, check=checker, overwrite=overwrite)
        return
    writer = {"pt2": write_pt2, "onnx": write_onnx}[fmt]
    report["export_dynamic_dims"] = writer(output, deploy, example, check=checker, dynamic=dynamic_shapes,
                                           overwrite=overwrite)


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
    if is_checkpoint_spec(spec):  # the deploy file's stored spec rebuilds it, or it is self-contained
        spec = ckpt.rebuild_spec or spec
    deploy = load_deployed_any(deployed, None if is_checkpoint_spec(spec) else spec)
    fmt = deploy_format_of(deployed)
    # Per-block figures where the deploy file keeps the block structure (safetensors, state dicts);
    # which blocks were converted is read off a shape-only conversion.
    report = None
    if fmt == "safetensors" or (fmt == "state_dict" and not is_checkpoint_spec(spec)):
        skeleton_spec = stored_spec(read_metadata(deployed)) if is_checkpoint_spec(spec) else spec
        report = reparameterize(skeleton_spec.build(device="meta").eval(), **deploy_file_options(deployed))[1]
    progress("verifying on random inputs")
    result = _run_verify(train, deploy, spec, report, opts)
    notes = list(ckpt.notes) + _low_precision_notes(result, train, deploy)
    out = {
        "ok": result.ok, "input": str(checkpoint), "output": str(deployed), "spec": spec.name, "format": fmt,
        "dtype": str(model_dtype(deploy)).removeprefix("torch."),
        "checkpoint_dtype": str(ckpt.dtype).removeprefix("torch."),
        "blocks": report.blocks if report else {},
        "params_before": count_parameters(train),
        "params_after": getattr(deploy, "num_parameters", None) or count_parameters(deploy),
        **_verification_dict(result),
    }
    if notes:
        out["notes"] = notes
    return finite_figures(out)


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
    from .safeio import check_output_target

    check_output_target(output, overwrite)
    torch.manual_seed(seed)
    model = spec.build()
    with torch.no_grad():
        randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if output.suffix == ".safetensors":
        write_state_safetensors(output, state, overwrite=overwrite)
    else:
        from .safeio import atomic_output, guarded_writer

        with atomic_output(output, overwrite) as tmp, guarded_writer(tmp) as f:
            torch.save(state, f)
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
                model = spec.build(device="meta").eval()
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
