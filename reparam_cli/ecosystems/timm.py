"""timm: `--spec timm:<model>[?key=value&...]` and what reparam needs to know about timm models.

The model is built with `timm.create_model(name, pretrained=False, **kwargs)`: weights come from
the checkpoint, nothing is downloaded. Query values are YAML scalars or lists
(`timm:repvgg_a0?num_classes=10&in_chans=1`). The verification input shape is the model's default
pretrained config (`input_size`), with `in_chans` applied. In a YAML spec, `builder:
timm:create_model` with `args: {model_name: repvgg_a0, ...}` does the same.

timm's blocks fuse themselves with `fuse()` / `reparameterize()` / `switch_to_deploy()` (the
conventions `timm.models.reparameterize_model` walks): the engine's native fallback converts
them, see `reparam_cli.native`. train.py checkpoints (`model_best.pth.tar`: `state_dict`,
`state_dict_ema`, `args` as an argparse Namespace) are read by `reparam_cli.checkpoint`.
"""

from __future__ import annotations

from typing import Any

from reparam_cli.core.spec import DEFAULT_INPUT_SHAPE, ModelSpec, TIMM_BUILDERS, _shape, library_ref
from reparam_cli.errors import SpecError
from reparam_cli.extras import import_extra

PREFIX = "timm:"
_REFUSED = {"pretrained": "weights come from the checkpoint, nothing is downloaded",
            "checkpoint_path": "pass the checkpoint to reparam instead",
            "pretrained_cfg_overlay": "weights come from the checkpoint, nothing is downloaded"}


def import_timm():
    """`import timm`, or a SpecError saying how to install it."""
    return import_extra("timm", "timm", "timm specs", SpecError)


def timm_create_model(model_name: str, **kwargs: Any):
    """`timm.create_model(model_name, pretrained=False, **kwargs)`, with errors a user can act on."""
    timm = import_timm()
    for key, why in _REFUSED.items():
        if kwargs.get(key):
            raise SpecError(f"timm spec {model_name!r}: {key} is not allowed ({why})")
        kwargs.pop(key, None)
    if not timm.is_model(model_name):
        import difflib

        close = difflib.get_close_matches(model_name, timm.list_models(), n=4, cutoff=0.6)
        raise SpecError(f"timm has no model {model_name!r}",
                        hint=f"did you mean {', '.join(close)}?" if close else "see timm.list_models()")
    return timm.create_model(model_name, pretrained=False, **kwargs)


def default_input_shape(model_name: str, in_chans: Any = None) -> tuple[int, ...]:
    """(1, C, H, W) from timm's pretrained config of the model (DEFAULT_INPUT_SHAPE without one)."""
    cfg = import_timm().get_pretrained_cfg(model_name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    shape = (1, *size) if size else DEFAULT_INPUT_SHAPE
    if isinstance(in_chans, int):
        shape = (shape[0], in_chans, *shape[2:])
    return shape


def timm_spec(ref: str) -> ModelSpec:
    """`timm:<model_name>[?key=value&...]` -> a spec building that timm model (see the module doc)."""
    model_name, args = library_ref(ref, PREFIX, "timm", "timm:repvgg_a0?num_classes=10")
    if not import_timm().is_model(model_name):
        timm_create_model(model_name)  # raises with suggestions
    return ModelSpec(name=ref, builder=TIMM_BUILDERS[0], args={"model_name": model_name, **args},
                     input_shape=_shape(default_input_shape(model_name, args.get("in_chans")), ref),
                     description=f"timm model {model_name}", source=ref)


spec = timm_spec  # the ecosystem file's spec resolver (see reparam_cli.ecosystems)
