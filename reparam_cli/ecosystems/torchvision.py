"""torchvision: `--spec torchvision:<builder>[?num_classes=10&...]`.

The model is built with `torchvision.models.get_model(name, weights=None, **kwargs)` for any
builder `torchvision.models.list_models()` lists (classification, detection, segmentation, video,
optical flow): weights always come from the checkpoint, nothing is downloaded (`weights` and
`weights_backbone` are refused). Query values are YAML scalars or lists
(`torchvision:resnet18?num_classes=10`). The verification input is what the builder's family
takes: 1x3x224x224 for classification and segmentation (299 for Inception v3), 1x3x8x112x112 for
video models, 1x3x320x320 for detection. In a YAML spec, `builder:
reparam_cli.ecosystems.torchvision:build_model` with `args: {name: resnet18, num_classes: 10}`
does the same.

torchvision's reference scripts (`references/classification/train.py`) save
`{"model", "optimizer", "lr_scheduler", "epoch", "args"}` (`args` an argparse Namespace): the
checkpoint reader takes `model` and keeps the state dict's `_metadata` (module versions, which
MNASNet checks when loading).
"""

from __future__ import annotations

from typing import Any

from reparam_cli.core.spec import ModelSpec, _shape, library_ref
from reparam_cli.errors import SpecError
from reparam_cli.extras import import_extra

PREFIX = "torchvision:"
BUILDER = f"{__name__}:build_model"  # as in ecosystems.STORED_BUILDERS
_REFUSED = {"weights": "weights come from the checkpoint, nothing is downloaded",
            "weights_backbone": "weights come from the checkpoint, nothing is downloaded",
            "pretrained": "weights come from the checkpoint, nothing is downloaded"}


def import_models():
    """`torchvision.models`, or a SpecError saying how to install torchvision."""
    return import_extra("torchvision.models", "torchvision", "torchvision specs", SpecError)


def builder_names() -> list[str]:
    """Every builder torchvision.models lists (quantized ones excepted: they are already fused)."""
    return [n for n in import_models().list_models() if not n.startswith("quantized_")]


def check_name(name: str) -> None:
    """Raise SpecError (one line, the closest names) for a name torchvision does not build."""
    names = builder_names()
    if name in names:
        return
    import difflib

    close = difflib.get_close_matches(name.lower().replace("-", "_"), names, n=4, cutoff=0.5)
    raise SpecError(f"torchvision has no model builder {name!r}",
                    hint=(f"did you mean {', '.join('torchvision:' + c for c in close)}?" if close
                          else "see torchvision.models.list_models()"))


def build_model(name: str, **kwargs: Any):
    """`torchvision.models.get_model(name, weights=None, **kwargs)` (see the module doc)."""
    for key, why in _REFUSED.items():
        if kwargs.get(key):
            raise SpecError(f"torchvision spec {name!r}: {key} is not allowed ({why})")
        kwargs.pop(key, None)
    check_name(name)
    models = import_models()
    extra = {"weights_backbone": None} if _family(name) in ("detection", "segmentation") else {}
    return models.get_model(name, weights=None, **extra, **kwargs)


def _family(name: str) -> str:
    models = import_models()
    for family in ("detection", "segmentation", "video", "optical_flow"):
        if name in models.list_models(module=getattr(models, family)):
            return family
    return "classification"


def default_input_shape(name: str) -> tuple[int, ...]:
    """The verification input a torchvision model of this family takes (see the module doc)."""
    family = _family(name)
    if family == "video":
        return (1, 3, 8, 112, 112)
    if family == "detection":
        return (1, 3, 320, 320)
    if name == "inception_v3":
        return (1, 3, 299, 299)
    return (1, 3, 224, 224)


def spec(ref: str) -> ModelSpec:
    """`torchvision:<builder>[?key=value&...]` -> a spec building that torchvision model."""
    name, args = library_ref(ref, PREFIX, "torchvision", "torchvision:resnet18?num_classes=10")
    check_name(name)
    if _family(name) == "optical_flow":
        raise SpecError(f"torchvision:{name} takes two images: a YAML or Python spec with an `inputs` hook is "
                        "needed for its verification input", hint="see the README's Python spec section")
    shape = args.pop("input_shape", None) or default_input_shape(name)
    return ModelSpec(name=ref, builder=BUILDER, args={"name": name, **args}, input_shape=_shape(shape, ref),
                     description=f"torchvision model {name}", source=ref)
