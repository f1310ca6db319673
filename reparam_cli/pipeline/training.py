from pathlib import Path

from torch import nn

from reparam_cli import ecosystems
from reparam_cli.core.spec import ModelSpec, is_checkpoint_spec
from reparam_cli.errors import CheckpointError, ReparamError
from reparam_cli.io.checkpoint import (AlreadyDeployed, Checkpoint, extract_checkpoint, find_module, fit_problems,
                                       load_into, read_raw)
from reparam_cli.io.metadata import is_deploy_metadata
from reparam_cli.io.safetensors import read_metadata
from reparam_cli.io.sniff import looks_like_safetensors
from reparam_cli.pipeline.deploy import deploy_skeleton, stored_spec_data
from reparam_cli.pipeline.specs import layout_hint
from reparam_cli.verification.equivalence import model_dtype


def load_training_model(checkpoint: str | Path, spec: ModelSpec, trust_pickle: bool = False, *,
                        ema: bool = False) -> nn.Module:
    """Build the spec's training model on `meta` and assign the checkpoint's tensors (no random init)."""
    return read_training_model(checkpoint, spec, trust_pickle=trust_pickle, ema=ema)[0]


def _refuse_reparam_deploy_file(checkpoint: Path) -> None:
    """A safetensors file carrying reparam's deploy metadata is a deploy file, not a training checkpoint."""

    # By content, not only by suffix: a checkpoint piped to stdin is read as /proc/self/fd/N.
    if not checkpoint.is_file() or not (checkpoint.suffix == ".safetensors" or looks_like_safetensors(checkpoint)):
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
    model = ecosystems.prepare(spec.build_meta())
    ckpt = extract_checkpoint(raw, key, strip, ema=ema, expected=model.state_dict().keys(), source=str(checkpoint))
    ckpt.state = ecosystems.checkpoint_keys(model, ckpt.state)  # e.g. transformers' legacy key names
    ckpt.notes.extend(n for n in spec.notes if n not in ckpt.notes)  # e.g. "built on cpu: ..."
    _fill_tied(model, ckpt)
    if fit_problems(model, ckpt.state):
        _refuse_deploy_form(raw, checkpoint, spec, ema)
    return load_into(model, ckpt.state, hint=lambda: layout_hint(ckpt.state, model, spec)).eval(), ckpt


def _fill_tied(model: nn.Module, ckpt: Checkpoint) -> None:
    """Tied tensors (one parameter under several names, as a weight-tied head): a checkpoint that
    stores it under one of its names only (safetensors' save_model drops the others) fits; the other
    names get the same tensor."""
    groups: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in ckpt.state]
        if len(names) > 1 and present:
            for n in names:
                ckpt.state.setdefault(n, ckpt.state[present[0]])


def _pickled_model(checkpoint: Path, trust_pickle: bool, ema: bool) -> tuple[nn.Module, Checkpoint]:
    """`--spec checkpoint`: the nn.Module pickled in the checkpoint is the training model. A library
    that knows the model (see `ecosystems.adopt`) may prepare it and give a spec that rebuilds it."""

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
    skeleton, conv = deploy_skeleton(spec)
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
