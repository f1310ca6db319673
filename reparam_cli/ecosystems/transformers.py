"""Hugging Face transformers: `--spec transformers:<model type or class>[?config overrides]` and
`--spec transformers:<save_pretrained folder>`.

Models are built from a configuration with the library's own classes, never `from_pretrained` of a
hub name: nothing is downloaded, the weights come from the checkpoint.

* `transformers:resnet?num_labels=10&depths=[1,1,1,1]`: a model type (`AutoConfig.for_model`),
  built as its image classifier (`AutoModelForImageClassification`) when it has one, else as its
  base model (`AutoModel`); the query sets configuration fields (values parsed as YAML);
* `transformers:ResNetForImageClassification?num_labels=10`: that model class, with its
  configuration class's defaults and the overrides;
* `transformers:path/to/folder` (what `save_pretrained` or the `Trainer` writes: `config.json`
  beside `model.safetensors`, sharded `model-0000x-of-0000y.safetensors` with their index, or
  `pytorch_model.bin`): the class its config's `architectures` names, built from that config. Pass
  the folder (or a Trainer `checkpoint-N/` folder) as the checkpoint too: the weights are read from it.

The verification input is the model's main input, `pixel_values` of (1, num_channels, image_size,
image_size) from the configuration (224 without one); outputs (`ModelOutput`) are compared leaf by
leaf. A stored spec keeps the configuration as data (`config`, a JSON mapping), so a deploy file
rebuilds without the folder.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from reparam_cli.core.spec import ModelSpec, _shape, library_ref
from reparam_cli.errors import SpecError
from reparam_cli.extras import import_extra

PREFIX = "transformers:"
BUILDER = f"{__name__}:build_model"  # as in ecosystems.STORED_BUILDERS
# Config fields that name files or the hub: not needed to build, and not data a deploy file keeps.
_DROPPED = ("_name_or_path", "_commit_hash", "auto_map")


def import_transformers():
    """`import transformers`, or a SpecError saying how to install it."""
    return import_extra("transformers", "transformers", "transformers specs", SpecError)


def _model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def _class_for(model_type: str, class_name: str | None):
    """The model class: `class_name` from transformers, else the model type's image classifier or base model."""
    transformers = import_transformers()
    if class_name:
        cls = getattr(transformers, class_name, None)
        if cls is None or not hasattr(cls, "config_class"):
            raise SpecError(f"transformers has no model class {class_name!r}",
                            hint="name a class such as ResNetForImageClassification, or a model type such as resnet")
        return cls
    from transformers.models.auto import modeling_auto as auto

    for mapping in ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_MAPPING_NAMES"):
        name = getattr(auto, mapping, {}).get(model_type)
        if isinstance(name, (tuple, list)):
            name = name[0]
        if name and getattr(transformers, name, None) is not None:
            return getattr(transformers, name)
    raise SpecError(f"transformers model type {model_type!r} has no model class reparam can build",
                    hint="name the class: transformers:<ModelClass>?...")


def build_model(model_type: str | None = None, model_class: str | None = None, config: dict | None = None,
                **overrides: Any):
    """A transformers model built from a configuration (see the module doc), in eval mode, without
    any download. `config`: a full configuration mapping (a config.json); `overrides`: fields set on it."""
    transformers = import_transformers()
    data = {k: v for k, v in (config or {}).items() if k not in _DROPPED}
    data.update(overrides)
    model_type = model_type or data.get("model_type")
    if model_class is None and config is not None:
        arch = data.get("architectures") or []
        model_class = arch[0] if arch and hasattr(transformers, arch[0]) else None
    if model_class:
        cls = _class_for("", model_class)
        conf_cls = cls.config_class
        data.pop("model_type", None)
        conf = conf_cls.from_dict(data) if config is not None else conf_cls(**data)
    else:
        if model_type not in _model_types():
            import difflib

            close = difflib.get_close_matches(str(model_type), _model_types(), n=4, cutoff=0.6)
            raise SpecError(f"transformers has no model type {model_type!r}",
                            hint=f"did you mean {', '.join('transformers:' + c for c in close)}?" if close
                            else "name a model type (resnet, convnext, ...) or a model class")
        data.pop("model_type", None)
        conf = transformers.AutoConfig.for_model(model_type, **data)
        cls = _class_for(model_type, None)
    model = cls(conf)  # from a configuration: random weights, replaced by the checkpoint's
    return model.eval()


def _config_file(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read {path}: {exc}",
                        hint="a transformers folder is what save_pretrained writes (config.json + weights)") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path} is not a JSON mapping")
    return data


def _input_shape(conf: dict) -> tuple[int, ...]:
    size = conf.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        h, w = (int(size[0]), int(size[-1]))
    else:
        h = w = int(size or 224)
    return (1, int(conf.get("num_channels", 3) or 3), h, w)


def spec(ref: str) -> ModelSpec:
    """`transformers:<model type | class | folder>[?overrides]` -> a spec building that model."""
    name, args = library_ref(ref, PREFIX, "transformers", "transformers:resnet?num_labels=10")
    shape = args.pop("input_shape", None)
    folder = Path(name)
    if folder.is_dir() or name.endswith("config.json"):
        folder = folder if folder.is_dir() else folder.parent
        conf = {k: v for k, v in _config_file(folder).items() if k not in _DROPPED}
        conf.update(args)
        build_args: dict[str, Any] = {"config": conf}
        desc = f"transformers model from {folder}"
        info = conf
    else:
        import_transformers()
        if name[:1].isupper():
            build_args = {"model_class": name, **args}
            cls = _class_for("", name)
            info = {**cls.config_class().to_dict(), **args}
        else:
            build_args = {"model_type": name, **args}
            if name not in _model_types():
                build_model(model_type=name)  # raises with the closest names
            info = {**import_transformers().AutoConfig.for_model(name).to_dict(), **args}
        desc = f"transformers model {name}"
    return ModelSpec(name=ref, builder=BUILDER, args=build_args,
                     input_shape=_shape(shape or _input_shape(info), ref), description=desc, source=ref)


# --------------------------------------------------------------------------- save_pretrained output (-f hf)
#
# A deploy model's structure is generally not the transformers architecture: the graph pass folds each
# conv+BatchNorm into a conv with a bias, a slot the architecture's conv (bias=False) does not have. The
# folder `-f hf` writes therefore holds the fused weights in the architecture's own keys: each folded
# BatchNorm stays, set to an exact bias-add (running_mean 0, running_var with var + eps == 1, weight 1,
# bias = the fused conv's bias), so `from_pretrained` loads it with no missing or unexpected key and
# computes the verified function (the per-channel scale is in the conv weights; the BatchNorm is a bias
# add, which any runtime fuses). A per-channel layer scale folded into the layer before it (ConvNeXt's
# layer_scale_parameter) is set to ones. The folder is loaded back with from_pretrained and compared with
# the deploy model before it is published; anything else the architecture cannot hold is refused in one line.

@contextlib.contextmanager
def _no_progress_bars():
    """transformers draws progress bars on stderr while saving and loading: not in reparam's output."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def is_pretrained_model(model) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (what `-f hf` can write)."""
    import sys

    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def checkpoint_keys(model, state: dict) -> dict:
    """Keys of a transformers checkpoint renamed as `from_pretrained` renames them (transformers 5 writes
    some models, ViT among them, under legacy names and maps them when loading: its conversion mapping).
    Only renamings: a tensor its loader would convert (split, merge, transpose) keeps its key, and the
    fit check names it. Keys the model already has are left as they are."""
    if not is_pretrained_model(model):
        return state
    expected = model.state_dict()
    if all(key in expected for key in state):
        return state
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers has no mapping: keys are as saved
        return state
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamed = {}
    for key, tensor in state.items():
        new = key
        if key not in expected:
            new, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
            if converted is not None or new in renamed:
                new = key
        renamed[new] = tensor
    return renamed


def _unit_variance(eps: float, dtype) -> "torch.Tensor":
    """A running_var v in `dtype` with float32(v + eps) == 1 where one exists (so BN divides by exactly 1)."""
    import torch

    v = torch.tensor(1.0 - eps, dtype=torch.float32)
    for _ in range(8):  # step to the float32 neighbour that makes v + eps round to 1
        total = (v + torch.tensor(eps, dtype=torch.float32)).item()
        if total == 1.0:
            break
        v = torch.nextafter(v, torch.tensor(0.0 if total > 1.0 else 2.0))
    return v.to(dtype)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def _is_scale(key: str, ref) -> bool:
    """A per-channel output scale the graph pass folds into the layer before it (ConvNeXt's
    `layer_scale_parameter`, CaiT-style `gamma`): set to ones, it multiplies by exactly 1."""
    name = key.rpartition(".")[2]
    return ref.dim() == 1 and ref.is_floating_point() and ("scale" in name or name in ("gamma", "gamma_1", "gamma_2"))


def pretrained_state(deploy, target) -> dict:
    """The state dict of `target` (the transformers architecture, freshly built) that computes what the
    deploy model computes: the deploy tensors under the keys they share, and each BatchNorm the graph
    pass folded away set to an exact bias-add holding its conv's fused bias (see above). Raises
    OutputError naming the first tensor the architecture has no place for."""
    import torch
    from torch import nn

    from reparam_cli.errors import OutputError

    name = type(target).__name__
    have, want = deploy.state_dict(), target.state_dict()
    state: dict = {}
    for key, ref in want.items():
        if key in have:
            if tuple(have[key].shape) != tuple(ref.shape):
                raise OutputError(f"-f hf: {key} has shape {tuple(have[key].shape)} in the deploy model, "
                                  f"{tuple(ref.shape)} in {name}", hint="write safetensors (reparam's deploy file)")
            state[key] = have[key]
    dtype = next((t.dtype for t in have.values() if t.is_floating_point()), torch.float32)
    folded = {}  # BatchNorms whose tensors the deploy model no longer has: exact identities first
    for path, m in target.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(f"{path}.{k}" in state for k in m.state_dict()):
            if not (m.affine and m.track_running_stats):
                raise OutputError(f"-f hf: {name}'s {path} ({type(m).__name__} without affine weights or running "
                                  "statistics) cannot be set to hold a folded bias", hint="write safetensors")
            n = m.num_features
            state.update({f"{path}.weight": torch.ones(n, dtype=dtype), f"{path}.bias": torch.zeros(n, dtype=dtype),
                          f"{path}.running_mean": torch.zeros(n, dtype=dtype),
                          f"{path}.running_var": _unit_variance(m.eps, dtype).expand(n).clone(),
                          f"{path}.num_batches_tracked": torch.zeros((), dtype=torch.long)})
            folded[path] = n
    order = {path: i for i, (path, _) in enumerate(target.named_modules())}
    for key in [k for k in have if k not in want]:
        owner = key.rpartition(".")[0]
        layer = dict(target.named_modules()).get(owner)
        if not (key.endswith(".bias") and isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
                and layer.bias is None):
            raise OutputError(f"-f hf: the deploy model holds {key}, which {name} has no place for",
                              hint="write safetensors (reparam's deploy file); load_deploy rebuilds it")
        n = have[key].numel()
        after = [p for p, f in folded.items() if f == n and order[p] > order.get(owner, -1)]
        if not after:
            raise OutputError(f"-f hf: no BatchNorm of {name} after {owner} can hold its fused bias",
                              hint="write safetensors (reparam's deploy file); load_deploy rebuilds it")
        bn = max(after, key=lambda p: (_common_prefix(p, owner), -order[p]))
        state[f"{bn}.bias"] = have[key]
        del folded[bn]
    for key in [k for k in want if k not in state and _is_scale(k, want[k])]:
        state[key] = torch.ones_like(want[key], dtype=dtype, device="cpu")  # folded into the layer before it
    missing = [k for k in want if k not in state]
    if missing:
        raise OutputError(f"-f hf: {name} needs {missing[0]}, which the deploy model no longer has"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}",
                          hint="pass --keep-unused if it was dropped as unused, or write safetensors")
    return state


def write_pretrained(folder, deploy, target) -> None:
    """Write what `save_pretrained` writes (config.json, model.safetensors) into `folder`: `target`
    (the architecture, built from the same configuration) holding `pretrained_state(deploy, target)`."""
    state = pretrained_state(deploy, target)
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    target.load_state_dict(state, strict=True)
    if dtype is not None:
        target.to(dtype)
    with _no_progress_bars():
        target.save_pretrained(str(folder), safe_serialization=True)


def load_pretrained(folder, dtype):
    """`<architecture class>.from_pretrained(folder)` as a user loads it, with its loading report:
    (model in eval mode, a list of 'missing/unexpected/mismatched: keys' problems)."""
    transformers = import_transformers()
    conf = _config_file(Path(folder))
    arch = (conf.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise SpecError(f"{folder}/config.json names no transformers architecture")
    with _no_progress_bars():
        model, info = cls.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    problems = [f"{kind}: {', '.join(map(str, keys))}" for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if (keys := info.get(kind))]
    return model.eval(), problems
