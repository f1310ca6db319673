"""The pipeline behind the CLI: checkpoint -> state dict -> training model -> recipes -> deploy model
-> verification -> file. Each function returns a plain dict report (what `--json` prints).

    init_checkpoint(spec, output)                 random training checkpoint for trying things out
    convert_checkpoint(checkpoint, spec, ...)     fuse, verify, write
    verify_checkpoint(checkpoint, deployed, ...)  compare a training checkpoint with a deploy file

Pipes (`-` for stdin/stdout) live in pipes.py, `reparam inspect` in inspection.py, folders in batch.py.
"""

from __future__ import annotations

import contextlib

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from reparam_cli import ecosystems
from reparam_cli._version import __version__
from reparam_cli.convert.engine import ConversionReport, reparameterize
from reparam_cli.core.spec import ModelSpec, is_checkpoint_spec
from reparam_cli.core.tensors import count_parameters, nonfinite_key, randomize_batchnorm, release_tensors
from reparam_cli.ecosystems.transformers import is_pretrained_model, load_pretrained, write_pretrained
from reparam_cli.errors import CheckpointError, Incomplete, OutputError, ReparamError, VerificationFailed
from reparam_cli.io.checkpoint import check_checkpoint_file, sha256_file, weights_in_folder
from reparam_cli.io.export import DTYPES, check_folder_target, write_folder, write_onnx, write_pt2, write_torchscript
from reparam_cli.io.formats import FOLDER_FORMATS, SUFFIX
from reparam_cli.io.safeio import atomic_output, check_output_target, guarded_writer, private_tmpdir
from reparam_cli.io.safetensors import read_metadata, write_safetensors, write_state_safetensors
from reparam_cli.io.sniff import deploy_format_of
from reparam_cli.pipeline.deploy import (compare_exported, deploy_skeleton, drop_modules, fuse_options_of,
                                         load_deployed_any, stored_spec, unused_modules)
from reparam_cli.pipeline.options import ConvertOptions, FuseOptions, Progress, VerifyOptions, no_progress
from reparam_cli.pipeline.report import (_block_errors, _low_precision_notes, _native_blocks, _verification_dict,
                                         checkpoint_overflow_notes, completeness_dict, finite_figures, floor_notes)
from reparam_cli.pipeline.specs import as_spec, builtin_data, builtin_names, load_spec
from reparam_cli.pipeline.training import read_training_model
from reparam_cli.quantize.equalize import equalize
from reparam_cli.verification.equivalence import (PassFailed, VerifyResult, cast_floating, compare_outputs,
                                                  make_call, model_dtype, run_model, verify)


def _wider(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether every `than` value is exact in `dtype` and `dtype` has more mantissa bits (float16 -> float32)."""
    if not (dtype.is_floating_point and than.is_floating_point):
        return False
    return torch.finfo(dtype).eps < torch.finfo(than).eps and torch.finfo(dtype).max >= torch.finfo(than).max


def _low_precision_limit(result: VerifyResult, dtype: torch.dtype) -> str:
    """For a failed float16/bfloat16 deploy model: the fused weights' own rounding error against the
    tolerance, and what to do, when that rounding is what limits it."""
    if dtype not in (torch.float16, torch.bfloat16):
        return ""
    rounding = result.weight_rounding_rel_err
    figure = f"the fused weights' rounding to {str(dtype).removeprefix('torch.')} alone is {rounding:.2g} " \
        f"(relative) against rtol {result.rtol:.2g}; " if rounding is not None else ""
    return f"; {figure}the {str(dtype).removeprefix('torch.')} deploy model itself is the limit: use --dtype float32"


def default_output(checkpoint: Path, fmt: str) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.deploy{SUFFIX[fmt]}")


def _check_output(checkpoint: Path, output: Path, overwrite: bool, fmt: str = "safetensors") -> None:
    if output.resolve() == checkpoint.resolve() or (fmt in FOLDER_FORMATS and output.resolve() in checkpoint.resolve().parents):
        raise OutputError(f"refusing to write the output over its input {checkpoint}", hint="pass another -o")
    if fmt in FOLDER_FORMATS:
        check_folder_target(output, overwrite)  # a new folder, or a save_pretrained one with --overwrite
    else:
        check_output_target(output, overwrite)  # no folder, FIFO or device; no existing file without --overwrite


def _shape(spec: ModelSpec, opts: VerifyOptions) -> tuple[int, ...]:
    return tuple(opts.input_shape or spec.input_shape)


def _example(spec: ModelSpec, opts: VerifyOptions):
    """One verification input (args, kwargs), or None where the spec's input hook fails."""
    try:
        return make_call(spec.input_hook(), _shape(spec, opts), torch.Generator().manual_seed(opts.seed))
    except PassFailed:
        return None


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
    elif exc.stage.startswith("making the verification input"):
        hint = "pass a smaller --input-shape N,C,H,W"
    else:
        hint = "the training model runs but the fused one fails: please report this with the spec"
    return ReparamError(f"{exc.stage} failed on verification input {shape}: {exc.detail}", hint=hint)


def save_deploy(path: str | Path, deploy: nn.Module, spec: ModelSpec | str, result: VerifyResult | None = None) -> Path:
    """Write an in-memory deploy model (from `reparameterize`) as a reparam safetensors deploy file,
    atomically, with the spec (so `load_deploy(path)` rebuilds it) and `result`'s figures (from
    `verify`; None records it as not verified) in its metadata. Returns the path."""
    spec = as_spec(spec)
    metadata = {"version": __version__, "spec": spec.to_json(), "source": "",
                "dtype": str(model_dtype(deploy)).removeprefix("torch."), "verification": _verification_dict(result)}
    write_safetensors(path, deploy, metadata)
    return Path(path)


def _run_verify(train: nn.Module, deploy: nn.Module, spec: ModelSpec, report: ConversionReport | None,
                opts: VerifyOptions) -> VerifyResult:
    blocks = report.verify_blocks if report else []
    shape = _shape(spec, opts)
    try:
        return verify(train, deploy, shape, blocks=blocks, samples=opts.samples, seed=opts.seed,
                      rtol=opts.rtol, atol=opts.atol, make_inputs=spec.input_hook())
    except PassFailed as exc:
        raise _pass_error(exc, shape) from exc.exc


def _overflow_in_checkpoint_dtype(deploy: nn.Module, spec: ModelSpec, opts: VerifyOptions, dtype: torch.dtype,
                                  report: ConversionReport | None) -> list[str]:
    """A float16/bfloat16 checkpoint converted to a wider deploy model: where its activations, on the
    verification input (the first sample), exceed the checkpoint dtype's range (a note)."""
    if dtype not in (torch.float16, torch.bfloat16) or model_dtype(deploy) in (torch.float16, torch.bfloat16):
        return []
    try:
        call = make_call(spec.input_hook(), _shape(spec, opts), torch.Generator().manual_seed(opts.seed))
    except PassFailed:
        return []
    return checkpoint_overflow_notes(deploy, call, dtype, [p for p, _ in report.verify_blocks] if report else ())


def _printable(name: str) -> str:
    """A file name as valid UTF-8 text (bytes that are not UTF-8 as \\xNN): what file metadata can hold."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def convert_checkpoint(
    checkpoint: str | Path,
    spec: ModelSpec | str,
    output: str | Path | None = None,
    options: ConvertOptions | None = None,
    *,
    progress: Progress = no_progress,
    source_name: str | None = None,
    **changes,
) -> dict:
    """Convert a training checkpoint into a deploy file. Raises VerificationFailed (nothing written)
    when the fused model does not match, ReparamError on bad input.

    `options` (a ConvertOptions; keyword arguments named like its fields change single options,
    e.g. `fmt="onnx", verify=False`) say how. Blocks are fused in float64 and the deploy model is
    written in the checkpoint's dtype, or in `dtype` ('float32', 'float16', 'bfloat16'). `ema` picks a checkpoint's EMA weights. TorchScript,
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
    `layout` ("default", or "reference": the papers' deploy models key for key, recipes and native
    methods only, as graph=False; recorded in the deploy file): the report says which (`layout`),
    whether the result has the reference layout (`reference_layout`) and, when the graph pass made it
    differ, that layout's parameter count (`params_reference`) and a note.
    `equalize` applies cross-layer equalization (`reparam_cli.quantize.equalize`) to the deploy
    model before it is verified (report key `equalization`; recorded in the deploy file, whose
    blocks are then compared end to end only).
    """
    o = ConvertOptions.of(options, **changes)
    fmt, verify_output, opts = o.fmt, o.verify, o.verify_options
    out_dtype = DTYPES[o.dtype] if o.dtype else None
    checkpoint = Path(checkpoint)
    spec = as_spec(spec)
    output = Path(output) if output else default_output(checkpoint, fmt)
    checkpoint = weights_in_folder(checkpoint)  # a save_pretrained / Trainer checkpoint-N folder: its weights
    _check_output(checkpoint, output, o.overwrite, fmt)

    # The input's checksum (for the metadata) is computed on the other core while we fuse, once its
    # first bytes show a checkpoint (a hash must not run away on /dev/zero or a huge sparse file).
    check_checkpoint_file(checkpoint)
    hasher = ThreadPoolExecutor(max_workers=1)
    source_sha256 = hasher.submit(sha256_file, checkpoint) if fmt == "safetensors" else None
    hasher.shutdown(wait=False)
    progress("reading checkpoint")
    train, ckpt = read_training_model(checkpoint, spec, trust_pickle=o.trust_pickle, ema=o.ema)
    bad = None if o.allow_nonfinite else nonfinite_key(ckpt.state)
    if bad is not None:
        raise CheckpointError(f"{checkpoint}: tensor {bad} holds NaN or infinite values; nothing was written",
                              hint="pass --allow-nonfinite to convert it anyway")
    named = spec.name
    spec = ckpt.rebuild_spec or spec  # --spec checkpoint: what rebuilds the model (input shape, deploy metadata)
    if fmt == "hf" and not is_pretrained_model(train):
        raise OutputError(f"-f hf writes a transformers save_pretrained folder, and the model built from {spec.name!r} "
                          f"is a {type(train).__name__}, not a transformers PreTrainedModel",
                          hint="choose safetensors, torchscript, pt2 or onnx")
    if fmt == "onnx" and verify_output and (out_dtype or ckpt.dtype) == torch.bfloat16:
        raise OutputError("onnxruntime cannot run bfloat16 convolutions on CPU, so a bfloat16 ONNX file cannot be "
                          "verified", hint="pass --dtype float16 or float32, or --no-verify")
    params_before = count_parameters(train)
    if out_dtype is not None and _wider(out_dtype, ckpt.dtype):
        # float16/bfloat16 weights widen exactly: fused from those exact values (in float64, by the
        # recipes) and rounded once, to --dtype, rather than rounded to the checkpoint's dtype first.
        train = train.to(out_dtype)
    progress("fusing blocks")
    # Without verification the training model is not needed again: free each block once fused.
    # Where the graph pass leaves BatchNorms (code fx cannot trace), one recorded forward pass on the
    # verification input proves the conv+BN pairs it can still fold; the file stores them (`recorded`).
    deploy, conv_report = reparameterize(train, consume=not verify_output, example_inputs=_example(spec, opts),
                                         **o.fuse.kwargs())
    deploy.eval()
    if out_dtype is not None and out_dtype != ckpt.dtype:
        deploy = deploy.to(out_dtype)
    if not conv_report.changed and not o.graph:
        raise ReparamError(f"the model built from spec {spec.name!r} has nothing to convert: no block with a recipe "
                           f"or a native method, and the graph pass is off ({conv_report.summary()})",
                           hint="drop --layout reference" if o.layout == "reference" else "drop --no-graph")
    if not conv_report.changed:  # nothing foldable is no error: the same function is written, verified as usual
        conv_report.notes.append(f"nothing to fold: {sum(1 for _ in train.modules())} modules looked at "
                                 f"({conv_report.summary()})")
    equalization = None
    if o.equalize:
        deploy, equalization = _equalize(deploy, spec, opts)
    unused: list[str] = []
    if verify_output and not o.keep_unused:
        unused, dropped_params = _drop_unused(deploy, spec, opts, conv_report)
        if unused:
            conv_report.notes.append(
                f"dropped {len(unused)} modules ({dropped_params:,} parameters) the deploy model's eval forward "
                f"never calls: {', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''} (--keep-unused keeps them)")
    result = None
    if verify_output:
        progress("verifying on random inputs")
        # equalization rescales block outputs (not the model's): then only the model is compared
        result = _run_verify(train, deploy, spec, None if o.equalize else conv_report, opts)
    report = {
        "ok": result.ok if result else True,
        "input": str(checkpoint), "output": str(output), "spec": named, "format": fmt,
        "dtype": str(model_dtype(deploy)).removeprefix("torch."),
        "checkpoint_dtype": str(ckpt.dtype).removeprefix("torch."),
        "blocks": conv_report.blocks, "native_blocks": _native_blocks(conv_report),
        **completeness_dict(conv_report),
        "params_before": params_before, "params_after": count_parameters(deploy),
        **_layout_figures(o, conv_report, spec),
        "flops_before": result.flops_train if result else None,
        "flops_after": result.flops_deploy if result else None,
        **_verification_dict(result),
        "block_errors": _block_errors(result),
    }
    if unused:
        report["dropped"] = unused
    if equalization is not None:
        report["equalization"] = equalization
        conv_report.notes.append("--equalize rescales the outputs of blocks (not the model's): verified end to end, "
                                 "no per-block figures")
    notes = list(ckpt.notes) + list(conv_report.notes) + _low_precision_notes(result, train, deploy) \
        + floor_notes(result)
    if result is not None:
        notes += _overflow_in_checkpoint_dtype(deploy, spec, opts, ckpt.dtype, conv_report)
    if notes:
        report["notes"] = notes
    finite_figures(report)
    if result is not None and not result.ok:
        why = f" ({result.nonfinite})" if result.nonfinite else ""
        why += _low_precision_limit(result, model_dtype(deploy))
        raise VerificationFailed(f"the deploy model does not match the training model{why}; nothing was written",
                                 report)
    if o.strict and not conv_report.complete:
        report["ok"] = False
        raise Incomplete(f"--strict: {conv_report.summary()}; nothing was written", finite_figures(report))

    # The training model is not needed again: its blocks' tensors go before the file is loaded back
    # (the checkpoint's state dict holds them too).
    del train
    ckpt.state = {}
    progress(f"writing {fmt}")
    metadata = {"version": __version__, "spec": spec.to_json(), "source": _printable(source_name or checkpoint.name),
                "blocks": conv_report.blocks, "dtype": report["dtype"], "verification": _verification_dict(result)}
    if source_sha256 is not None:
        metadata["source_sha256"] = source_sha256.result()
    if o.equalize:  # block outputs are rescaled: `reparam verify` compares the model end to end only
        metadata["equalized"] = True
    metadata["options"] = replace(o.fuse, unused=tuple(unused), recorded=tuple(conv_report.recorded) or None,
                                  inputs=tuple(conv_report.inputs) or None).stored()
    write_deploy(output, fmt, deploy, spec, opts, result, report, metadata=metadata, dynamic_shapes=o.dynamic_shapes,
                 overwrite=o.overwrite)
    return finite_figures(report)


def _layout_figures(o: ConvertOptions, conv_report: ConversionReport, spec: ModelSpec) -> dict:
    """The report's layout keys: `layout` (as asked) and `reference_layout`, whether the deploy model
    has the reference layout (the blocks' own deploy forms, i.e. the papers' deploy models key for
    key: nothing folded beyond the recipes and native methods). When the graph pass made it differ,
    `params_reference` (that layout's parameter count, from a shape-only rebuild) and a note saying
    that --layout reference writes the reference layout."""
    same = o.layout == "reference" or not (conv_report.regions or o.linear_as_conv)
    figures: dict = {"layout": o.layout, "reference_layout": same}
    if same or not conv_report.regions:
        return figures
    if not is_checkpoint_spec(spec):
        try:
            figures["params_reference"] = count_parameters(deploy_skeleton(spec, FuseOptions(layout="reference"))[0])
        except ReparamError:  # a figure only: a spec that cannot be rebuilt shape-only goes without it
            pass
    n = len(conv_report.regions)
    examples = ", ".join(f"{r.layer or r.path or '<root>'}: {r.before} -> {r.after}" for r in conv_report.regions[:2])
    conv_report.notes.append(
        f"layout: the graph pass folded {n} region{'s' if n != 1 else ''} that the reference layout keeps "
        f"({examples}{', ...' if n > 2 else ''}), so this file does not load into the reference deploy model (the paper's); "
        "--layout reference (or --no-graph) writes the reference layout")
    return figures


def _drop_unused(deploy: nn.Module, spec: ModelSpec, opts: VerifyOptions,
                 conv_report: ConversionReport) -> tuple[list[str], int]:
    """Drop (in place) the modules one eval forward of `deploy` on the verification input never
    calls (GoogLeNet's and Inception's auxiliary heads): (their paths, their parameter count).
    Verification then runs on the model without them, so what is written is what was verified.
    A model that no longer runs without them (code that reads them without calling them) keeps them."""
    try:
        call = make_call(spec.input_hook(), _shape(spec, opts), torch.Generator().manual_seed(opts.seed))
        found = unused_modules(deploy, call)
    except PassFailed:
        return [], 0  # verification says why the model does not run
    if not found:
        return [], 0
    kept = {p: deploy.get_submodule(p) for p in found}
    count = sum(p.numel() for m in kept.values() for p in m.parameters())
    saved = (list(conv_report.converted), list(conv_report.regions), list(conv_report.remaining),
             list(conv_report.kept), list(conv_report.skipped))
    drop_modules(deploy, found, conv_report)
    try:
        run_model(deploy, call, "the deploy model without its unused modules")
    except PassFailed:  # restore them
        for path, module in kept.items():
            parent, _, name = path.rpartition(".")
            deploy.get_submodule(parent)._modules[name] = module
        (conv_report.converted, conv_report.regions, conv_report.remaining, conv_report.kept,
         conv_report.skipped) = saved
        return [], 0
    return found, count


def _equalize(deploy: nn.Module, spec: ModelSpec, opts: VerifyOptions) -> tuple[nn.Module, dict]:
    """`convert --equalize`: an equalized copy of the deploy model (a copy: layers no recipe changed
    are shared with the training model, which verification compares it with) and the pairs and
    skipped layers."""
    import copy

    try:
        args, _ = make_call(spec.input_hook(), _shape(spec, opts), torch.Generator().manual_seed(opts.seed))
    except PassFailed as exc:
        raise _pass_error(exc, _shape(spec, opts)) from exc.exc
    deploy = copy.deepcopy(deploy)
    return deploy, equalize(deploy, tuple(cast_floating(args, model_dtype(deploy)))).as_dict()


def _verified_output(deploy: nn.Module, call64, result: VerifyResult | None):
    """The verified deploy model's output on the verification input (`call64`, the first sample):
    the one verification computed, else (None when verification did not run) a pass now."""
    if result is None:
        return None
    if result.first_output is not None:
        return result.first_output
    return run_model(deploy, call64, "the verified deploy model")


def write_deploy(output: Path, fmt: str, deploy: nn.Module, spec: ModelSpec, opts: VerifyOptions,
                 result: VerifyResult | None, report: dict, metadata: dict, dynamic_shapes: str = "auto",
                 overwrite: bool = False) -> None:
    """Write `deploy` in `fmt` atomically. When verification ran, the written file is first loaded back
    the way a user loads it (`load_deploy` for safetensors, its runtime for TorchScript, pt2 and ONNX)
    and compared with the deploy model on the verification input: its figures go into `report`
    (`export_*`), and a mismatch raises VerificationFailed with nothing written. A safetensors
    write consumes `deploy`: its tensors are released once in the file (the caller uses it no more)."""
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
            overflow = _low_precision_notes(result, deploy, deploy) if fmt != "safetensors" else []
            where += f" ({overflow[0]})" if overflow else ""
            raise VerificationFailed(f"the {fmt} file does not match the deploy model {where}; nothing was written",
                                     report)

    if fmt == "safetensors":
        # The deploy model's output is taken before writing; once written, its tensors are released
        # (they are in the file), so loading the file back does not need a second copy in memory.
        expected = _verified_output(deploy, call64, result)

        def check_safetensors(tmp: Path) -> None:
            from reparam_cli.pipeline.deploy import load_deploy

            release_tensors(deploy)
            loaded = load_deploy(tmp, spec)
            try:
                c = compare_outputs(run_model(loaded, call64, "the deploy file loaded back"), expected,
                                    result.rtol, result.atol, "the deploy file loaded back")
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

    if fmt == "hf":
        _write_pretrained(output, deploy, spec, call64, result, failed, overwrite)
        return

    # torch.onnx and onnxruntime drop files into $TMPDIR (.ses, torchinductor_*): a folder reparam removes
    with private_tmpdir() if fmt == "onnx" else contextlib.nullcontext():
        _write_exported(output, fmt, deploy, call64, dtype, result, report, failed, dynamic_shapes, overwrite)


def _write_pretrained(output: Path, deploy: nn.Module, spec: ModelSpec, call64, result: VerifyResult | None,
                      failed, overwrite: bool) -> None:
    """-f hf: a save_pretrained folder of the model's transformers architecture holding the fused weights
    (ecosystems/transformers.py says how). When verification ran, the folder is loaded back with
    `from_pretrained` as a user loads it (no missing or unexpected key allowed) and compared with the
    deploy model on the verification input before it is renamed into place."""
    dtype = model_dtype(deploy)
    expected = _verified_output(deploy, call64, result)

    def check(tmp: Path) -> None:
        loaded, problems = load_pretrained(tmp, dtype)
        if problems:
            raise OutputError(f"from_pretrained reports {problems[0]} for the written folder; nothing was written")
        try:
            c = compare_outputs(run_model(loaded, call64, "the folder loaded with from_pretrained"), expected,
                                result.rtol, result.atol, "the folder loaded with from_pretrained")
        except PassFailed as exc:
            raise OutputError(f"{exc.stage} failed: {exc.detail}; nothing was written") from None
        figures = {"runtime": "from_pretrained", "max_abs_err": c.max_abs_err, "max_rel_err": c.max_rel_err, "ok": c.ok}
        if c.nonfinite:
            figures["nonfinite"] = c.nonfinite
        failed(figures, "when loaded with from_pretrained")

    target = spec.build().eval()  # the architecture, from the same configuration
    write_folder(output, lambda tmp: write_pretrained(tmp, deploy, target), check if result is not None else None,
                 overwrite=overwrite)


def _write_exported(output, fmt, deploy, call64, dtype, result, report, failed, dynamic_shapes, overwrite) -> None:
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
    if fmt == "pt2":
        report["export_dynamic_dims"] = write_pt2(output, deploy, example, check=checker, dynamic=dynamic_shapes,
                                                  overwrite=overwrite)
        return
    written: dict[str, str] = {}

    def metadata(dims: list[str]) -> dict[str, str]:  # what the model's library reads from the file (ultralytics)
        written.update(ecosystems.export_metadata(deploy, fmt, tuple(args[0].shape), dims))
        return written

    report["export_dynamic_dims"] = write_onnx(output, deploy, example, check=checker, dynamic=dynamic_shapes,
                                               overwrite=overwrite, metadata=metadata)
    if written:
        report["export_metadata"] = sorted(written)


def verify_checkpoint(
    checkpoint: str | Path,
    deployed: str | Path,
    spec: ModelSpec | str,
    *,
    verify_options: VerifyOptions | None = None,
    trust_pickle: bool = False,
    progress: Progress = no_progress,
    ema: bool = False,
) -> dict:
    """Compare a training checkpoint with a deploy file (reparam safetensors, TorchScript, pt2 or ONNX)."""
    try:
        onnx = deploy_format_of(deployed) == "onnx"
    except Exception:  # noqa: BLE001 - reported with its own sentence below
        onnx = False
    with private_tmpdir() if onnx else contextlib.nullcontext():  # onnxruntime drops .ses into $TMPDIR
        return _verify_checkpoint(checkpoint, deployed, spec, verify_options=verify_options,
                                  trust_pickle=trust_pickle, progress=progress, ema=ema)


def _verify_checkpoint(checkpoint, deployed, spec, *, verify_options, trust_pickle, progress, ema) -> dict:
    spec = as_spec(spec)
    opts = verify_options or VerifyOptions()
    progress("reading checkpoint")
    train, ckpt = read_training_model(checkpoint, spec, trust_pickle=trust_pickle, ema=ema)
    progress("reading deploy file")
    if is_checkpoint_spec(spec):  # the deploy file's stored spec rebuilds it, or it is self-contained
        spec = ckpt.rebuild_spec or spec
    deploy = load_deployed_any(deployed, None if is_checkpoint_spec(spec) else spec)
    fmt = "hf" if Path(deployed).is_dir() else deploy_format_of(deployed)
    # Per-block figures where the deploy file keeps the block structure (safetensors, state dicts);
    # which blocks were converted is read off a shape-only conversion.
    report = None
    equalized = fmt == "safetensors" and read_metadata(deployed).get("equalized") is True  # blocks rescaled
    if (fmt == "safetensors" and not equalized) or (fmt == "state_dict" and not is_checkpoint_spec(spec)):
        skeleton_spec = stored_spec(read_metadata(deployed)) if is_checkpoint_spec(spec) else spec
        fuse = fuse_options_of(deployed)  # None: a plain state dict, whose layout its keys tell
        report = deploy_skeleton(skeleton_spec, fuse, state=deploy.state_dict() if fuse is None else None)[1]
    progress("verifying on random inputs")
    result = _run_verify(train, deploy, spec, report, opts)
    notes = list(ckpt.notes) + _low_precision_notes(result, train, deploy) + floor_notes(result)
    notes += _overflow_in_checkpoint_dtype(deploy, spec, opts, ckpt.dtype, report)
    out = {
        "ok": result.ok, "input": str(checkpoint), "output": str(deployed), "spec": spec.name, "format": fmt,
        "dtype": str(model_dtype(deploy)).removeprefix("torch."),
        "checkpoint_dtype": str(ckpt.dtype).removeprefix("torch."),
        "blocks": report.blocks if report else {},
        "params_before": count_parameters(train),
        "params_after": n if isinstance(n := getattr(deploy, "num_parameters", None), int) else count_parameters(deploy),
        **_verification_dict(result),
    }
    if notes:
        out["notes"] = notes
    return finite_figures(out)


def init_checkpoint(spec: ModelSpec | str, output: str | Path, *, seed: int = 0, overwrite: bool = False) -> dict:
    """Write a training checkpoint with random weights and randomized BatchNorm statistics."""
    spec = as_spec(spec)
    output = Path(output)

    check_output_target(output, overwrite)
    torch.manual_seed(seed)
    model = spec.build()
    with torch.no_grad():
        randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if output.suffix == ".safetensors":
        write_state_safetensors(output, state, overwrite=overwrite)
    else:
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

    rows = []
    for name in builtin_names():
        row: dict = {"name": name}
        try:
            spec = load_spec(name)
            raw = builtin_data(name)
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
