"""Deploy models: the one rebuild of a deploy skeleton from a spec (`deploy_skeleton`), deploy files
loaded back as models (`load_deploy` for reparam's safetensors and plain fused state dicts; any
format with `load_deployed_any`), and an exported file compared with the deploy model it was
written from (`compare_exported`).

Formats are read and written in `reparam_cli/io/`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from reparam_cli import ecosystems
from reparam_cli.convert.engine import ConversionReport, reparameterize
from reparam_cli.core.messages import describe
from reparam_cli.core.spec import ModelSpec
from reparam_cli.errors import CheckpointError, OutputError
from reparam_cli.io.checkpoint import extract_checkpoint, fit_problems, load_into, read_raw, with_metadata
from reparam_cli.io.runtimes import RUNTIME, load_exported
from reparam_cli.io.metadata import is_deploy_metadata
from reparam_cli.io.safetensors import read_metadata, read_tensors
from reparam_cli.io.sniff import deploy_format_of
from reparam_cli.pipeline.options import FuseOptions
from reparam_cli.pipeline.specs import as_spec, check_stored_spec
from reparam_cli.verification.equivalence import _first_tensor, compare_outputs, run_model


def stored_spec(meta: dict[str, object], *, trust: bool = False) -> ModelSpec | None:
    """The ModelSpec a deploy file was converted with, from its decoded metadata (None if absent).

    The stored spec is data: it is parsed, never imported, and returned only when rebuilding it
    runs nothing but reparam's own or an integrated library's builders (`specs.SAFE_SPEC_KINDS`);
    any other builder raises SpecError unless `trust` (--trust-spec) is set.
    """
    return None if meta.get("spec") is None else check_stored_spec(stored_spec_data(meta), trust)


def stored_spec_data(meta: dict[str, object]) -> ModelSpec:
    """The stored ModelSpec, parsed but not checked: for its name and figures only, never to build."""
    stored = meta["spec"]
    return ModelSpec.from_json(stored if isinstance(stored, str) else json.dumps(stored))


def fuse_options_of(path: str | Path) -> FuseOptions | None:
    """How a reparam safetensors deploy file was fused (its `options` metadata); None for any other
    file (a plain state dict, or safetensors without reparam's metadata), which carries no such
    record: its layout is told from its keys (`deploy_skeleton(spec, state=...)`)."""
    if deploy_format_of(path) != "safetensors":
        return None
    meta = read_metadata(path)
    return FuseOptions.from_stored(meta.get("options")) if is_deploy_metadata(meta) else None


def unused_modules(model: nn.Module, call) -> list[str]:
    """The modules holding tensors that one eval-mode forward of `model` on `call` = (args, kwargs)
    never calls (auxiliary heads, training-only branches): the outermost such paths, in model order.
    Modules reached without being called (a parameter read directly) hold tensors that are used: a
    module is unused only when neither it nor anything inside it is called and its tensors are not
    read elsewhere (shared with a called module)."""
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _args: called.add(id(mod))) for m in model.modules()]
    try:
        run_model(model, call, "the deploy model (looking for modules it never calls)")
    finally:
        for h in hooks:
            h.remove()
    used_tensors = {id(t) for m in model.modules() if id(m) in called
                    for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    found: list[str] = []

    def walk(m: nn.Module, path: str) -> None:
        for name, child in m.named_children():
            sub = f"{path}.{name}" if path else name
            inner = list(child.modules())
            tensors = [t for c in inner for t in (*c.parameters(recurse=False), *c.buffers(recurse=False))]
            if not any(id(c) in called for c in inner) and tensors and not any(id(t) in used_tensors for t in tensors):
                found.append(sub)
            else:
                walk(child, sub)

    walk(model, "")
    return found


def drop_modules(model: nn.Module, paths, report: ConversionReport | None = None) -> nn.Module:
    """`model` with the modules at `paths` set to None (in place), and `report`'s entries inside them removed."""
    for path in paths:
        parent, _, name = path.rpartition(".")
        try:
            owner = model.get_submodule(parent)
        except AttributeError:
            continue
        if name in owner._modules:
            owner._modules[name] = None
    if report is not None and paths:
        def inside(p: str) -> bool:
            return any(p == d or p.startswith(d + ".") for d in paths)

        report.converted = [b for b in report.converted if not inside(b.path)]
        report.regions = [r for r in report.regions if not inside(r.path)]
        report.remaining = [r for r in report.remaining if not inside(r.path)]
        report.kept = [r for r in report.kept if not inside(r.path)]
        report.skipped = [r for r in report.skipped if not inside(r.path)]
    return model


def deploy_skeleton(spec: ModelSpec, fuse: FuseOptions | None = None, *, state: dict | None = None,
                    training: nn.Module | None = None) -> tuple[nn.Module, ConversionReport]:
    """The spec's deploy model on the meta device (shapes only), and the conversion's report: the one
    place that rebuilds a deploy model's structure (then a file's tensors are assigned to it).

    `fuse`: how the file was fused (`fuse_options_of`). A plain state dict (`state`, a reference
    implementation's layout) carries no such record: the default fusion is used when the state fits
    it, else the reference layout (`--layout reference`: no graph pass, so the conv+BN pairs and
    BatchNorms outside known blocks stay, as in the papers' deploy models).
    `training`: the spec's training model on meta, when the caller has built it already (it is
    converted in place). Non-persistent buffers are real (`ModelSpec.build_meta`).
    """
    def build(options: FuseOptions) -> tuple[nn.Module, ConversionReport]:
        model = training if training is not None else ecosystems.prepare(spec.build_meta())
        deploy, report = reparameterize(model.eval(), **options.kwargs())
        return drop_modules(deploy, options.unused, report), report

    skeleton = build(fuse or FuseOptions())
    if fuse is None and state is not None and fit_problems(skeleton[0], state):
        plain = build(FuseOptions(layout="reference"))
        if not fit_problems(plain[0], state):
            return plain
    return skeleton


def load_deploy(path: str | Path, spec: ModelSpec | str | None = None, *, trust_spec: bool = False) -> nn.Module:
    """Rebuild a runnable deploy model from a reparam safetensors file.

    The spec stored in the file is used unless `spec` (a ModelSpec or a --spec reference) is given.
    A torch pickle holding a plain state dict of the fused model (a reference layout) needs `spec`
    (see `load_deploy_state_dict`).
    A stored spec is rebuilt only when it names a built-in or timm builder with plain arguments;
    one naming other code (a module:function, a .py file) raises SpecError unless `trust_spec`.
    The training model is built on the meta device and converted shape-only (in the layout the file
    records, `--layout` / `--no-graph`; a file without reparam's metadata in the one its keys fit),
    then the file's tensors are assigned to the resulting skeleton. Non-persistent buffers, which the file does
    not hold, are computed as the model's constructor computes them (`ModelSpec.build_meta`).
    """
    spec = as_spec(spec) if spec is not None else None
    if deploy_format_of(path) == "state_dict":
        return load_deploy_state_dict(path, spec)
    if spec is None:
        spec = stored_spec(read_metadata(path), trust=trust_spec)
        if spec is None:
            raise CheckpointError(f"{path} carries no reparam spec metadata", hint="pass --spec to rebuild it")
    fuse, tensors = fuse_options_of(path), read_tensors(path)
    skeleton, _ = deploy_skeleton(spec, fuse, state=tensors if fuse is None else None)  # no record: as the keys fit
    # safetensors holds no state-dict `_metadata` (module versions): the file was written from a
    # model of this code, so the skeleton's own versions are the file's (MNASNet checks them).
    state = with_metadata(tensors, getattr(skeleton.state_dict(), "_metadata", None))
    return load_into(skeleton, state, what="deploy file").eval()


def load_deploy_state_dict(path: str | Path, spec: ModelSpec | str | None) -> nn.Module:
    """A deploy model from a plain state dict of the fused model (`.pth`, `.pth.tar`): what a reference
    implementation's convert script or timm's reparameterize + torch.save writes.

    The file is read with weights_only (wrappers such as `state_dict` and `module.` prefixes are
    unwrapped as for training checkpoints) and loaded strictly into the spec's deploy skeleton.
    """
    if spec is None:
        raise CheckpointError(f"{path} is a plain state dict without reparam metadata",
                              hint="pass --spec (spec=...) naming the architecture it was fused from")
    spec = as_spec(spec)
    expected = deploy_skeleton(spec)[0].state_dict().keys()
    state = extract_checkpoint(read_raw(path), expected=expected, source=str(path)).state
    skeleton, _ = deploy_skeleton(spec, state=state)
    if fit_problems(skeleton, state) and not fit_problems(spec.build(device="meta"), state):
        raise CheckpointError(f"{path} is a training checkpoint of {spec.name}, not a deploy file",
                              hint="convert it with `reparam convert`, or pass its deploy file")
    return load_into(skeleton, state, what="deploy state dict").eval()


def is_deploy_state(spec: ModelSpec, state: dict, training: nn.Module | None = None) -> bool:
    """Whether a state dict's keys and shapes fit the spec's deploy skeleton (and not its training
    model: `training`, the spec's model on meta when the caller has it built already)."""
    training = spec.build(device="meta") if training is None else training
    return bool(fit_problems(training, state)) and not fit_problems(deploy_skeleton(spec, state=state)[0], state)


def load_deployed_any(path: str | Path, spec=None) -> nn.Module:
    """A deploy model from a safetensors file written by reparam, a plain deploy state dict (with a
    spec), a TorchScript, pt2 or ONNX file, or a save_pretrained folder (`-f hf`, read with from_pretrained)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():  # -f hf: a save_pretrained folder
        from reparam_cli.ecosystems.transformers import load_pretrained

        model, problems = load_pretrained(path, None)
        if problems:
            raise CheckpointError(f"from_pretrained reports {problems[0]} for {path}")
        return model
    if not path.is_file():
        raise CheckpointError(f"deploy file not found: {path}")
    fmt = deploy_format_of(path)
    if fmt in ("safetensors", "state_dict"):
        return load_deploy(path, spec)
    return load_exported(path, fmt)


def compare_exported(path: str | Path, fmt: str, deploy: nn.Module, x: Tensor | tuple,
                     rtol: float, atol: float) -> dict[str, object]:
    """Run an exported file with its own runtime on `x` (a tensor or a tuple of arguments, in the
    file's dtype) and compare its first output with the deploy module's.

    Returns {"runtime", "max_abs_err", "max_rel_err", "ok"} (errors NaN and not ok when either output
    holds NaN/Inf; "nonfinite" then says where): ok when max |exported - deploy| <= atol + rtol * max|deploy|.
    The deploy module runs as verification runs it (float32 for float16/bfloat16 weights).
    """

    args = x if isinstance(x, tuple) else (x,)
    if fmt == "onnx" and any(a.dtype == torch.bfloat16 for a in args):
        raise OutputError("onnxruntime cannot run bfloat16 convolutions on CPU, so the ONNX file cannot be verified",
                          hint="use --dtype float16 or float32, or --no-verify")
    exported = load_exported(path, fmt)
    with torch.no_grad():
        expected = _first_tensor(run_model(deploy, (args, {}), "the deploy model"))
        try:
            got = _first_tensor(exported(*args))
        except Exception as exc:
            raise OutputError(f"the exported {fmt} file fails to run in {RUNTIME[fmt]}: {describe(exc)}") from None
    if got.shape != expected.shape:
        raise OutputError(f"the exported {fmt} file gives output shape {tuple(got.shape)}, "
                          f"the deploy model {tuple(expected.shape)}")
    c = compare_outputs(got, expected, rtol, atol, f"exported {fmt} file")
    figures = {"runtime": RUNTIME[fmt], "max_abs_err": c.max_abs_err, "max_rel_err": c.max_rel_err, "ok": c.ok}
    if c.nonfinite:
        figures["nonfinite"] = c.nonfinite
    return figures
