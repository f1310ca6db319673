"""mmpretrain (OpenMMLab): `--spec mmpretrain:<model>` and mmengine's checkpoint layout.

`mmpretrain:repvgg-a0_8xb32_in1k` builds the model with `mmpretrain.get_model(name,
pretrained=False)` (nothing is downloaded); the name may also be the config file a training run
dumped into its work dir (`mmpretrain:work_dirs/my_run/my_run.py`). Config overrides go in the
query (dotted keys set into the config's `model`): `mmpretrain:repvgg-a0_8xb32_in1k?head.num_classes=10`. The
verification input is the crop size of the config's test pipeline (224 unless it says otherwise).

Checkpoints: mmengine's `save_checkpoint` (work_dirs/<run>/epoch_N.pth, best_*.pth) stores
`meta`, `state_dict` (`backbone.` / `neck.` / `head.` keys, which is the classifier's own
layout), `optimizer`, `param_schedulers`, `message_hub` and, with the EMAHook,
`ema_state_dict`. mmengine's EMAHook swaps the averaged weights into `state_dict` before saving
(the raw ones go to `ema_state_dict`), so the default `state_dict` is already the model mmpretrain
deploys: convert without `--ema`. `message_hub` pickles mmengine's HistoryBuffer (with bound
methods, i.e. `getattr`), which `torch.load(weights_only=True)` refuses: reading such a file
without `--trust-pickle` relies on reparam's restricted unpickler (reparam_cli.checkpoint), which
takes the tensors and leaves those objects inert.

mmpretrain's backbones fuse themselves with `switch_to_deploy()` (RepVGG, MobileOne, RepMLP,
RIFormer, LeViT), their blocks also define `reparameterize()` returning tensors, and they override
`train()` (returning None): the native fallback (reparam_cli.native) handles all three.

Recipes for two blocks mmpretrain's conv families are built of:
* mmcv's `ConvModule` (conv -> norm -> act, MobileNet-V2/V3, ShuffleNet, DenseNet, CSPNet, HRNet,
  ...): its BatchNorm folded into the conv, `with_norm` off. Its `forward(x, activate=True,
  norm=True)` takes flags that torch.fx makes proxies of, so the graph pass cannot trace it;
  a ConvModule without a BatchNorm after its conv is kept as it is. The engine descends into any
  block containing a recipe instead of calling the block's own method, so the recipe is for
  `FoldableConvModule`, the class `prepare(model)` gives the ConvModules outside blocks with their
  own deploy method (RepMLPNet's stay ConvModules: its `switch_to_deploy()` runs as in mmpretrain);
* TinyViT's `ConvBN2d` (a Sequential conv2d + bn2d): one conv. Its own `fuse()` reads `self.c`,
  which it does not have (AttributeError), so the native fallback cannot use it.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from typing import Any

import torch
from torch import nn

from reparam_cli.blocks.registry import native_method, recipe
from reparam_cli.core import algebra as A
from reparam_cli.core.spec import DEFAULT_INPUT_SHAPE, ModelSpec, _shape, library_ref
from reparam_cli.errors import SpecError
from reparam_cli.extras import import_extra

PREFIX = "mmpretrain:"
FAMILY = "mmpretrain"


@contextlib.contextmanager
def _quiet():
    """mmcv-lite warns that its compiled ops are missing (not needed here); mmengine logs to
    stdout, which must stay clean for --json: send it to stderr."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.filterwarnings("ignore", message=".*mmcv-lite.*|.*MultiScaleDeformableAttention.*")
        yield


def import_mmpretrain():
    """`import mmpretrain` (quietly), or a SpecError saying how to install it."""
    with _quiet():
        import_extra("mmpretrain.apis", "mmpretrain", "mmpretrain specs", SpecError)
        return import_extra("mmpretrain", "mmpretrain", "mmpretrain specs", SpecError)


# --------------------------------------------------------------------------- deploy blocks

with _quiet():
    from mmcv.cnn import ConvModule
    from mmpretrain.models.backbones.tinyvit import ConvBN2d


def _foldable_conv(conv: nn.Module) -> bool:
    """A plain zero-padded nn.Conv1d/2d/3d (mmcv's adaptive-padding or weight-standardised convs are not)."""
    return type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and conv.padding_mode == "zeros"


class FoldableConvModule(ConvModule):
    """A ConvModule outside any block with its own deploy method (see `prepare`): same forward."""


def prepare(model: nn.Module) -> nn.Module:
    """The model's ConvModules outside blocks with a native deploy method become FoldableConvModule
    (in place; state dict and forward unchanged), so the ConvModule recipe folds them while blocks
    such as RepMLPNet still convert by their own `switch_to_deploy()`."""
    def walk(module: nn.Module, inside_native: bool) -> None:
        inside_native = inside_native or (module is not model and native_method(module) is not None)
        if type(module) is ConvModule and not inside_native:
            module.__class__ = FoldableConvModule
        for child in module.children():
            walk(child, inside_native)

    walk(model, False)
    return model


@recipe(FoldableConvModule, family=FAMILY)
def fuse_conv_module(block: ConvModule) -> nn.Module:
    """mmcv ConvModule, order conv -> norm -> act with a BatchNorm: act(bn(conv(x))) -> act(conv'(x)),
    conv' = fuse_bn(conv, bn) (P1), `with_norm` off. Any other ConvModule is kept as it is."""
    new = copy.copy(block)
    new.__dict__ = dict(block.__dict__)
    new._modules = {k: copy.deepcopy(m) for k, m in block._modules.items()}
    new._parameters, new._buffers = dict(block._parameters), dict(block._buffers)
    order = tuple(block.order)
    norm = getattr(block, block.norm_name, None) if block.with_norm and block.norm_name else None
    if (type(block).forward is not ConvModule.forward or not isinstance(norm, nn.modules.batchnorm._BatchNorm)
            or order.index("norm") != order.index("conv") + 1 or not _foldable_conv(block.conv)
            or not norm.track_running_stats or norm.running_mean is None):
        return new
    conv = A.to_module(A.fuse_bn(A.from_module(block.conv, torch.float64), norm), dtype=block.conv.weight.dtype)
    new._modules["conv"] = conv
    del new._modules[block.norm_name]
    new.with_norm, new.norm_name = False, None
    return new


@recipe(ConvBN2d, family=FAMILY)
def fuse_tinyvit_conv_bn(block: ConvBN2d) -> nn.Module:
    """TinyViT's ConvBN2d: bn2d(conv2d(x)) -> conv'(x), conv' = fuse_bn(conv2d, bn2d) (P1)."""
    return A.to_module(A.fuse_bn(A.from_module(block.conv2d, torch.float64), block.bn2d),
                       dtype=block.conv2d.weight.dtype)


# --------------------------------------------------------------------------- specs

def _override(config, key: str, value: Any) -> None:
    """Set `config.model.<key>` (dotted) to `value`, replacing what is there (a dict value replaces
    a string, e.g. a custom `backbone.arch`, which mmengine's merge refuses)."""
    from mmengine.config import ConfigDict

    *parents, leaf = key.split(".")
    node = config.model
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = ConfigDict()
        node = node[p]
    node[leaf] = ConfigDict(value) if isinstance(value, dict) else value


def _config(model: str):
    """The mmengine Config of a model name or config file."""
    mmpretrain = import_mmpretrain()
    from mmengine.config import Config

    if model.endswith(".py"):
        try:
            return Config.fromfile(model)
        except Exception as exc:  # a user's config file: report, do not crash
            raise SpecError(f"cannot read the mmpretrain config {model}: {type(exc).__name__}: {exc}") from None
    try:
        return mmpretrain.apis.model.ModelHub.get(model).config
    except ValueError:
        import difflib

        close = difflib.get_close_matches(model, mmpretrain.list_models(), n=4, cutoff=0.6)
        raise SpecError(f"mmpretrain has no model {model!r}",
                        hint=f"did you mean {', '.join(close)}?" if close else "see mmpretrain.list_models()") from None


def build_model(model: str, **overrides: Any):
    """`mmpretrain.get_model(model, pretrained=False)`: the whole classifier (data preprocessor,
    backbone, neck, head), `overrides` set on its config's `model` first (dotted keys:
    `{"head.num_classes": 10}`), its log lines sent to stderr."""
    mmpretrain = import_mmpretrain()
    config = copy.deepcopy(_config(model))  # the hub caches its configs
    for key, value in overrides.items():
        if key.split(".")[-1] in ("pretrained", "init_cfg") and value:
            raise SpecError(f"mmpretrain spec {model!r}: {key} is not allowed "
                            "(weights come from the checkpoint, nothing is downloaded)")
        _override(config, key, value)
    with _quiet():
        try:
            return mmpretrain.get_model(config, pretrained=False)
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise SpecError(f"mmpretrain could not build {model!r}: {type(exc).__name__}: {exc}") from None


def default_input_shape(config) -> tuple[int, ...]:
    """(1, 3, S, S) with S the crop size of the config's test pipeline (224 without one)."""
    pipeline = (config.get("test_dataloader") or {}).get("dataset", {}).get("pipeline") or config.get("test_pipeline") or []
    for step in pipeline:
        size = step.get("crop_size") if isinstance(step, dict) else None
        if isinstance(size, int):
            return (1, 3, size, size)
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return (1, 3, int(size[1]), int(size[0]))  # mmpretrain sizes are (w, h)
    return DEFAULT_INPUT_SHAPE


def mmpretrain_spec(ref: str) -> ModelSpec:
    """`mmpretrain:<model name or config.py>[?key.sub=value&...]` -> a spec (see the module doc)."""
    model, args = library_ref(ref, PREFIX, "mmpretrain", "mmpretrain:repvgg-a0_8xb32_in1k")
    config = _config(model)
    return ModelSpec(name=ref, builder=f"{__name__}:build_model", args={"model": model, **args},
                     input_shape=_shape(default_input_shape(config), ref),
                     description=f"mmpretrain model {model}", source=ref)


spec = mmpretrain_spec  # the ecosystem file's spec resolver (see reparam_cli.ecosystems)
