"""ultralytics (YOLOv3-v12, YOLO11, YOLO26, RT-DETR): its blocks, its model specs, its checkpoints.

What ultralytics' own `BaseModel.fuse()` does, and what reparam does instead (the same deploy
model, its arithmetic from `algebra` in float64, every block verified):

    ultralytics fuse()                               reparam
    Conv / DWConv: fold bn into conv, forward_fuse   recipe: fuse_bn(conv, bn), the same forward swap
    Conv2: fuse_convs() (1x1 into the 3x3), then     recipe: fuse_bn(add(conv, cv2), bn)
      as Conv
    ConvTranspose: fold bn, forward_fuse             recipe: fuse_bn on the transposed weight
    RepConv (RepC3, RepNCSPELAN4's RepConvN, ...):   recipe: add(conv_bn(3x3), conv_bn(1x1),
      fuse_convs(), forward_fuse                       bn_as_conv(identity)), forward_fuse
    RepVGGDW (YOLOv10): fuse(), forward_fuse         recipe: add(conv_bn(7x7), conv_bn(3x3)), forward_fuse
    Detect.fuse(): drop the unused one-to-many       `finish`: the head's own fuse() on the deploy copy
      branch of end-to-end heads (YOLOv10, YOLO26)
    (RT-DETR's decoder input_proj conv+BN kept)      `finish`: folded too (fuse_bn)

Deploy blocks keep ultralytics' module types, attribute names and state-dict keys
(`model.0.conv.weight`, `model.0.conv.bias`), with `forward` swapped for `forward_fuse` as
ultralytics does, so a reparam deploy model is what `model.fuse()` gives.

Specs: `ultralytics:yolov8n.yaml?nc=3` builds `DetectionModel('yolov8n.yaml', nc=3)` (the model


class from the YAML's task; RT-DETR YAMLs build an `RTDETRDetectionModel`); in a YAML spec,
`builder: reparam_cli.ecosystems.ultralytics:build_model` with `args: {cfg: yolov8n.yaml, nc: 3}`.
Models are built with ultralytics' logging quieted, and in export mode: the detection head returns
its decoded predictions alone (B, 4 + nc, anchors), as ultralytics' own exporters set it, since
the raw training-branch outputs that eval mode returns beside them are what fusing end-to-end heads
removes. Construction probes the strides with a real forward pass (`.item()`), which the meta
device cannot run: these models are built on the CPU (a note says so).

Exports: `-f onnx` files get the `metadata_props` ultralytics' own exporter writes (`export_metadata`:
task, class names, stride, imgsz, args ...), which its AutoBackend reads, so `YOLO('deploy.onnx')` and
`yolo predict` run them as ultralytics' own exports.

Checkpoints: ultralytics saves whole pickled models (float16) under `model` / `ema`, beside
`train_args` and more; reading them needs `--trust-pickle`. `--spec checkpoint` then converts the
pickled model itself, in float32 as ultralytics loads it, and `adopt` stores the model's own
YAML configuration in the deploy file, so `load_deploy` rebuilds it without the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.nn.modules import Conv, Conv2, ConvTranspose, Detect, RepConv, RepVGGDW, RTDETRDecoder

from reparam_cli.blocks.common import conv_bn_kernel, conv_bn_lazy
from reparam_cli.blocks.registry import recipe
from reparam_cli.core import algebra as A
from reparam_cli.core.messages import quiet_logger
from reparam_cli.core.spec import ModelSpec, library_ref, load_yaml
from reparam_cli.core.tensors import shallow_copy
from reparam_cli.errors import NotEquivalent, SpecError

FAMILY = "ultralytics"
SPEC_PREFIX = "ultralytics:"
BUILDER = f"{__name__}:build_model"  # as in ecosystems.STORED_BUILDERS
DEFAULT_IMGSZ = 640  # ultralytics' default image size: the verification input is 1x3x640x640


# --------------------------------------------------------------------------- deploy blocks

def _fused_form(block: nn.Module, drop: tuple[str, ...], **children: nn.Module) -> nn.Module:
    """A copy of `block` without the children (or attributes) in `drop`, with `children` set, and
    `forward` swapped for `forward_fuse` as ultralytics' fuse() does. `block` is not modified."""
    new = shallow_copy(block)
    # Kept children (the activation) are copied: `reparameterize(consume=True)` frees the training
    # block's tensors once it is fused, and an activation may have some (PReLU).
    new._modules = {k: copy.deepcopy(m) for k, m in block._modules.items() if k not in drop and k not in children}
    for name in drop:
        new.__dict__.pop(name, None)
    new._modules.update(children)
    new.forward = new.forward_fuse
    return new


def _check_training_form(block: nn.Module, base: type, branch: str) -> None:
    """Refuse what the recipe for `base` does not compute: a subclass that overrides its forward,
    or a block already fused by ultralytics (its training-only `branch` child is gone)."""
    name = type(block).__name__
    if type(block).forward is not base.forward or type(block).forward_fuse is not base.forward_fuse:
        raise NotEquivalent(f"{name} overrides {base.__name__}.forward, which the {base.__name__} recipe does not know")
    if getattr(block, branch, None) is None:
        raise NotEquivalent(f"this ultralytics {name} has no {branch}: it is already fused",
                            hint="convert the training checkpoint, not a fused model")


@recipe(Conv, family=FAMILY)
def fuse_conv(block: Conv) -> nn.Module:
    """Conv / DWConv: act(bn(conv(x))) -> act(conv'(x)) with conv' = fuse_bn(conv, bn) (P1)."""
    _check_training_form(block, Conv, "bn")
    conv = A.to_module(conv_bn_kernel(block), dtype=block.conv.weight.dtype)
    return _fused_form(block, ("bn",), conv=conv)


@recipe(Conv2, family=FAMILY)
def fuse_conv2(block: Conv2) -> nn.Module:
    """Conv2: act(bn(conv(x) + cv2(x))) -> act(conv'(x)), conv' = fuse_bn(add(conv, cv2 centred), bn)."""
    _check_training_form(block, Conv2, "bn")
    summed = A.add(A.from_module(block.conv, torch.float64), A.from_module(block.cv2, torch.float64))
    conv = A.to_module(A.fuse_bn(summed, block.bn), dtype=block.conv.weight.dtype)
    return _fused_form(block, ("bn", "cv2"), conv=conv)


@recipe(ConvTranspose, family=FAMILY)
def fuse_conv_transpose(block: ConvTranspose) -> nn.Module:
    """ConvTranspose: act(bn(deconv(x))) -> act(deconv'(x)). A transposed conv's weight is
    (in, out, kh, kw): BN scales its output channels, dim 1, so P1 runs on the weight transposed."""
    _check_training_form(block, ConvTranspose, "bn")
    deconv = block.conv_transpose
    if not isinstance(block.bn, nn.modules.batchnorm._BatchNorm):  # built with bn=False: nothing to fold
        return _fused_form(block, ("bn",), conv_transpose=copy.deepcopy(deconv))
    if deconv.groups != 1:
        raise NotEquivalent("a grouped ConvTranspose with BatchNorm is not supported")
    as_conv = A.Kernel(deconv.weight.transpose(0, 1), deconv.bias).to(torch.float64)
    fused = A.fuse_bn(as_conv, block.bn)
    new = nn.ConvTranspose2d(deconv.in_channels, deconv.out_channels, deconv.kernel_size, deconv.stride,
                             deconv.padding, deconv.output_padding, deconv.groups, True, deconv.dilation,
                             device="meta")
    dtype, device = deconv.weight.dtype, deconv.weight.device
    new.weight = nn.Parameter(fused.weight.transpose(0, 1).to(device=device, dtype=dtype))
    new.bias = nn.Parameter(fused.bias.to(device=device, dtype=dtype))
    return _fused_form(block, ("bn",), conv_transpose=new)


@recipe(RepConv, family=FAMILY)
def fuse_repconv(block: RepConv) -> nn.Module:
    """RepConv: act(conv_bn(3x3) + conv_bn(1x1) + bn(x)) -> act(conv(x)), as its fuse_convs()."""
    _check_training_form(block, RepConv, "conv1")
    branches = [conv_bn_lazy(block.conv1), conv_bn_lazy(block.conv2)]
    if block.bn is not None:
        branches.append(A.bn_as_conv(block.bn, dtype=torch.float64))
    dtype = block.conv1.conv.weight.dtype
    conv = A.to_module(A.add(*branches, dtype=dtype), dtype=dtype)
    return _fused_form(block, ("conv1", "conv2", "bn", "id_tensor"), conv=conv)


@recipe(RepVGGDW, family=FAMILY)
def fuse_repvggdw(block: RepVGGDW) -> nn.Module:
    """RepVGGDW (YOLOv10): act(conv_bn(7x7 dw) + conv_bn(3x3 dw)) -> act(conv(x)), as its fuse()."""
    _check_training_form(block, RepVGGDW, "conv1")
    dtype = block.conv.conv.weight.dtype
    fused = A.add(conv_bn_lazy(block.conv), conv_bn_lazy(block.conv1), dtype=dtype)
    return _fused_form(block, ("conv1",), conv=A.to_module(fused, dtype=dtype))


# --------------------------------------------------------------------------- model-level steps

def _fold_sequential_conv_bn(seq: nn.Sequential) -> nn.Sequential:
    """Sequential(Conv2d, BatchNorm2d) -> Sequential(Conv2d with bias): key `<seq>.0` stays."""
    conv = A.to_module(A.fuse_bn(A.from_module(seq[0], torch.float64), seq[1]), dtype=seq[0].weight.dtype)
    return nn.Sequential(conv)


_FUSED_HEADS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # heads whose own fuse() `finish` ran


def ran_natively(module: nn.Module) -> str | None:
    """The report's sentence for a detection head whose own fuse() `finish` ran, else None."""
    if module in _FUSED_HEADS:
        return f"its own fuse() ran ({type(module).__name__}.fuse(), as ultralytics' model.fuse() does)"
    return None


def finish(model: nn.Module, deployed: nn.Module) -> nn.Module:
    """What ultralytics' fuse() does beyond its blocks, on the deploy model (never on `model`):
    each detection head's own `fuse()` (end-to-end heads drop their unused one-to-many branch),
    and RT-DETR's decoder input projections (conv + BN in an nn.Sequential) folded (P1)."""
    originals = {id(m) for m in model.modules()}
    for m in deployed.modules():
        if id(m) in originals:  # shared with the training model (nothing converted inside): leave it
            continue
        if isinstance(m, Detect):
            m.fuse()
            _FUSED_HEADS.add(m)
        elif isinstance(m, RTDETRDecoder):
            m.input_proj = nn.ModuleList(
                _fold_sequential_conv_bn(p) if len(p) == 2 and isinstance(p[1], nn.BatchNorm2d) else p
                for p in m.input_proj)
    return deployed


# --------------------------------------------------------------------------- specs

def _quiet():
    """ultralytics logs model summaries and overrides to stdout (reparam's stdout is for --json)."""
    return quiet_logger("ultralytics")


def _model_class(cfg: dict):
    from ultralytics.nn import tasks

    head = str(cfg.get("head", [[None, None, ""]])[-1][-2])
    if head.startswith(("WorldDetect", "YOLOEDetect", "YOLOESegment")):
        raise SpecError(f"YOLO-World and YOLOE models ({head} head) are not supported yet: their class text "
                        "embeddings are an attribute of the pickled model, not part of its state dict, so a "
                        "deploy file rebuilt from tensors would not compute what was verified",
                        hint="export them with ultralytics' own `model.fuse()` and `export()` for now")
    if head == "RTDETRDecoder":
        return tasks.RTDETRDetectionModel
    task = tasks.guess_model_task(cfg)
    classes = {"detect": "DetectionModel", "segment": "SegmentationModel", "classify": "ClassificationModel",
               "pose": "PoseModel", "obb": "OBBModel"}
    if task not in classes:
        raise SpecError(f"ultralytics task {task!r} is not supported", hint=f"supported: {', '.join(classes)}")
    return getattr(tasks, classes[task])


def _anchors_follow_dtype(head: nn.Module, args: tuple) -> None:
    """Forward pre-hook: recompute a head's cached anchors when the input dtype changes, or when they
    were cached while tracing (torch.export / ONNX export) and the input is real, or the reverse.
    Heads cache anchors per input shape only, so after verification's float64 reference pass the
    float32 pass would reuse float64 anchors (RT-DETR's decoder then fails: "mat1 and mat2 must have
    the same dtype"), and after an export at the input's own shape the deploy model would reuse the
    exporter's fake anchors ("Could not guard on data-dependent expression")."""
    from torch._subclasses.fake_tensor import is_fake

    anchors, x = getattr(head, "anchors", None), args[0][0]
    if isinstance(anchors, torch.Tensor) and anchors.numel() and (
            anchors.dtype != x.dtype or is_fake(anchors) != is_fake(x)):
        head.shape, head.shapes = None, []  # Detect's and RTDETRDecoder's cache keys


def prepare(model: nn.Module) -> nn.Module:
    """Heads in ultralytics' export mode, returning their decoded predictions alone (see the module
    doc), with anchors that follow the input dtype. Returns `model`, changed in place."""
    for m in model.modules():
        if isinstance(m, (Detect, RTDETRDecoder)):
            m.export = True
            if _anchors_follow_dtype not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_anchors_follow_dtype)
    return model


def build_model(cfg: str | dict, nc: int | None = None, ch: int = 3, verbose: bool = False) -> nn.Module:
    """An ultralytics model from its YAML (a bundled name such as `yolov8n.yaml`, a path, or the
    configuration dict a model carries as `model.yaml`), in export mode. Nothing is downloaded."""
    from ultralytics.nn.tasks import yaml_model_load

    with _quiet(), _restricted():
        try:
            config = copy.deepcopy(cfg) if isinstance(cfg, dict) else yaml_model_load(cfg)
        except (FileNotFoundError, OSError) as exc:
            raise SpecError(f"ultralytics has no model configuration {cfg!r}: {exc}",
                            hint="name a bundled YAML such as yolov8n.yaml, or a path to one") from None
        _no_downloads(config)
        return prepare(_model_class(config)(config, ch=ch, nc=nc, verbose=verbose))


def _no_downloads(config: dict) -> None:
    """A `TorchVision` layer (yolo11-cls-resnet18.yaml) downloads torchvision weights by default:
    build it with weights=None, as the weights come from the checkpoint."""
    for layer in list(config.get("backbone") or []) + list(config.get("head") or []):
        if len(layer) > 3 and layer[2] == "TorchVision":
            args = list(layer[3]) + [None] * max(0, 3 - len(layer[3]))
            args[2] = None  # (c2, model, weights, unwrap, truncate, split) as written in the YAML
            layer[3] = args


@contextlib.contextmanager
def _restricted():
    """Build in ultralytics' restricted mode: its model parser then resolves the YAML's `activation`
    without eval() and accepts only nn.Module layer classes as layers. A configuration is data (it
    may come from a deploy file's metadata), so it must not be able to name code to run."""
    from ultralytics.nn import tasks

    safe = getattr(tasks, "_SafeLoad", None)
    if safe is None or not getattr(safe, "SUPPORTED", False):
        raise SpecError("this ultralytics release cannot build a model configuration without eval()",
                        hint="pip install -U 'ultralytics>=8.4'")
    before = getattr(safe._local, "active", False)
    safe._local.active = True
    try:
        yield
    finally:
        safe._local.active = before


build_model.not_on_meta = "ultralytics models probe their strides with a forward pass (`.item()`) when built"


def spec(ref: str):
    """`ultralytics:<yaml>[?nc=3&ch=1]` -> a ModelSpec building that model (verification input 640x640)."""

    cfg, query_args = library_ref(ref, SPEC_PREFIX, "ultralytics", "ultralytics:yolov8n.yaml?nc=3")
    args: dict[str, Any] = {"cfg": _own_yaml(cfg), **query_args}
    unknown = set(args) - {"cfg", "nc", "ch"}
    if unknown:
        raise SpecError(f"spec {ref!r}: unknown arguments {', '.join(sorted(unknown))}", hint="known: nc, ch")
    ch = args.get("ch", 3)
    return ModelSpec(name=ref, builder=BUILDER, args=args, input_shape=(1, int(ch), DEFAULT_IMGSZ, DEFAULT_IMGSZ),
                     description=f"ultralytics model {cfg}", source=ref)


def _own_yaml(cfg: str) -> str | dict:
    """A bundled YAML stays a name (`yolov8n.yaml`); the user's own YAML file is read here, so the spec
    a deploy file stores is the configuration itself (self-contained data) rather than a path."""
    path = Path(cfg)
    if not path.is_file():
        return cfg
    import yaml

    try:
        config = load_yaml(path.read_text(), f"ultralytics model configuration {cfg}")
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read ultralytics model configuration {cfg}: {exc}") from None
    if not isinstance(config, dict):
        raise SpecError(f"ultralytics model configuration {cfg} is not a mapping")
    return config


def adopt(module: nn.Module):
    """An ultralytics model read whole from a checkpoint, as ultralytics loads it: in float32
    (checkpoints store float16) and, like built models, in export mode. Returns (model, a spec
    rebuilding it from the YAML configuration it carries as `model.yaml`, notes), or None for a
    model that is not ultralytics'."""
    from ultralytics.nn.tasks import BaseModel


    config = getattr(module, "yaml", None)
    if not isinstance(module, BaseModel) or not isinstance(config, dict):
        return None
    notes = []
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    if dtype != torch.float32:
        module = module.float()
        notes.append(f"the ultralytics model is stored in {str(dtype).removeprefix('torch.')}: converted in float32, "
                     "as ultralytics loads it (--dtype float16 writes a float16 deploy file)")
    ch = int(config.get("channels", 3))
    name = Path(str(config.get("yaml_file", "model.yaml"))).name  # where the YAML was is not needed
    stored = {**_plain(config), "yaml_file": name}
    rebuild = ModelSpec(name=f"{SPEC_PREFIX}{name}", builder=BUILDER, args={"cfg": stored, "ch": ch},
                        input_shape=(1, ch, DEFAULT_IMGSZ, DEFAULT_IMGSZ),
                        description=f"ultralytics model {name} (configuration from the checkpoint)", source="checkpoint")
    return prepare(module), rebuild, notes


def export_metadata(model: nn.Module, fmt: str, shape: tuple[int, ...], dynamic_dims: list[str]) -> dict | None:
    """The ONNX `metadata_props` ultralytics' own exporter writes (engine/exporter.py), which its
    AutoBackend reads back: so `YOLO('deploy.onnx')` and `yolo predict model=deploy.onnx` run the file
    with the model's task, class names, stride and image size. Values are strings as ultralytics writes
    them (`str()` of ints, lists and dicts, read back with ast.literal_eval). Dynamic height and width
    are ultralytics' `dynamic=True`; with fixed ones the predictor letterboxes to `imgsz`, the exported
    size. None for another format or a model that is not ultralytics'."""
    from ultralytics import __version__ as ultralytics_version
    from ultralytics.nn.tasks import BaseModel, guess_model_task

    from reparam_cli._version import __version__

    if fmt != "onnx" or not isinstance(model, BaseModel) or len(shape) != 4:
        return None
    config = getattr(model, "yaml", None) or {}
    task = getattr(model, "task", None) or guess_model_task(model)
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
    names = getattr(model, "names", None) or {i: f"{i}" for i in range(int(config.get("nc", 0)))}
    names = {int(k): str(v) for k, v in (names.items() if isinstance(names, dict) else enumerate(names))}
    stride = getattr(model, "stride", 32)
    dynamic = "height" in dynamic_dims and "width" in dynamic_dims
    batch = 1 if "batch" in dynamic_dims else int(shape[0])
    imgsz = [int(shape[2]), int(shape[3])]
    half = next((p.dtype for p in model.parameters()), torch.float32) == torch.float16
    name = Path(str(config.get("yaml_file", "model.yaml"))).stem.replace("yolo", "YOLO")
    meta: dict[str, Any] = {
        "description": f"Ultralytics {name} model, fused by reparam {__version__}",
        "author": "Ultralytics", "date": datetime.now().astimezone().isoformat(), "version": ultralytics_version,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com",
        "stride": int(torch.as_tensor(stride).max()), "task": task, "head": type(head).__name__, "batch": batch,
        "imgsz": imgsz, "names": names,
        "args": {"batch": batch, "imgsz": imgsz, "half": half, "dynamic": dynamic, "nms": False},
        "channels": int(shape[1]), "end2end": bool(getattr(model, "end2end", False)),
    }
    if task == "pose" and head is not None and hasattr(head, "kpt_shape"):
        meta["kpt_shape"] = list(head.kpt_shape)
        if getattr(model, "kpt_names", None):
            meta["kpt_names"] = model.kpt_names
    return {k: str(v) for k, v in meta.items()}


def _plain(value: Any) -> Any:
    """The configuration as JSON-safe data (YAML gives tuples or numpy scalars at times)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return value.item() if hasattr(value, "item") else str(value)
