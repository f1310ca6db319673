"""Sweep a model zoo: build each model of a list, save it as that zoo's users save it, convert it
with reparam's CLI pipeline, rebuild the written file, and compare with the library's own fuse.
Writes docs/sweep-<zoo>.md.

    PYTHONPATH=. python scripts/zoo_sweep.py torchvision            # one model per family (default list)
    PYTHONPATH=. python scripts/zoo_sweep.py torchvision --all      # every classification builder (slow)
    PYTHONPATH=. python scripts/zoo_sweep.py transformers
    PYTHONPATH=. python scripts/zoo_sweep.py ultralytics --only yolo11n.yaml --print
    PYTHONPATH=. python scripts/zoo_sweep.py timm --scan-cache /tmp/timm-scan.json   # one model per family
    PYTHONPATH=. python scripts/zoo_sweep.py mmpretrain

Lists: torchvision, one model per family (`--all`: every classification builder); transformers,
the vision model types that build from a small config; ultralytics, every task YAML in its
smallest size; timm, the smallest model with a BatchNorm of every timm model file (`timm.models.<family>`),
found by building every registered model on the meta device (families whose smallest such model
has more than 30 M parameters are left out and named); mmpretrain, the smallest classifier with a
BatchNorm of each conv family of its model zoo (configs/<family>/, built on the meta device).

Per model:
1. Build with the library (no weights: torchvision `weights=None`, transformers from a config,
   ultralytics from its YAML, timm `pretrained=False`, mmpretrain `get_model(..., pretrained=False)`),
   randomise BatchNorm statistics, save as the zoo saves it: torchvision's reference-script
   checkpoint (`{"model", "optimizer", "lr_scheduler", "epoch", "args"}` with an argparse
   Namespace), a transformers `save_pretrained` folder, an ultralytics `.pt` (the whole model
   pickled in float16 under `model`, read with --trust-pickle --spec checkpoint), timm train.py's
   CheckpointSaver file (`{"epoch", "arch", "optimizer", "version", "args", "state_dict", "metric",
   "saver"}`, `args` an argparse Namespace), mmengine's CheckpointHook file (`{"meta",
   "state_dict", "optimizer", "param_schedulers", "message_hub"}`, written here with plain types).
2. Convert through `convert_checkpoint` (what `reparam convert` runs) with the zoo's route
   (`torchvision:<name>`, `transformers:<folder>`, `timm:<name>`, `mmpretrain:<name>`), on a small
   input (`--size`, default 64; 128 for ultralytics; the model's default size where it cannot take
   the small one), verified against a float64 reference; the written file is rebuilt with
   `load_deploy` and compared with the float64 reference.
3. The library's own fuse on the same model, where one exists: `torch.fx.experimental.optimization.fuse`
   (torchvision; timm and mmpretrain where the model traces), ultralytics `model.fuse()`, timm's
   `reparameterize_model` (models with `fuse`/`reparameterize`/`switch_to_deploy` methods, then the
   fx fuser), mmpretrain's `switch_to_deploy()` of the backbone/neck/head (then the fx fuser);
   transformers has none. Columns: BatchNorms, parameters and FLOPs, reparam's vs the library's,
   and errors relative to the float64 reference. BatchNorms before conversion are modules; after,
   both sides count the batch-norm ops one forward pass runs, and FLOPs are torch's FlopCounterMode
   figures of that pass (ops, not modules: torch.fx traces through timm's BatchNormAct2d and Linear,
   so a module count would miss what its graph still computes).

Status `ok`: converted with exit 0, no more BatchNorms, parameters or FLOPs than the library's fuse,
the rebuilt file within 1e-4 of the reference; otherwise what failed.
"""

from __future__ import annotations

import argparse
import argparse as _argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from reparam_cli.core.tensors import count_parameters  # noqa: E402
from timm_families import batchnorms, number_cell  # noqa: E402  (scripts/timm_families.py)

ROOT = Path(__file__).resolve().parent.parent

# smallest first, so a time budget (--budget) covers as many families as it can
TORCHVISION = ["squeezenet1_1", "mnasnet0_5", "mobilenet_v3_small", "shufflenet_v2_x0_5", "regnet_x_400mf",
               "regnet_y_400mf", "mobilenet_v2", "resnet18", "googlenet", "alexnet", "efficientnet_b0", "densenet121",
               "vgg11_bn", "resnet50", "inception_v3", "convnext_tiny", "resnext50_32x4d", "swin_t", "maxvit_t",
               "efficientnet_v2_s", "vit_b_16", "wide_resnet50_2"]
# model type -> config overrides that keep it small (CPU, 2 cores)
TRANSFORMERS = {
    "resnet": {"depths": [1, 1, 1, 1], "hidden_sizes": [32, 64, 96, 128], "embedding_size": 32},
    "regnet": {"depths": [1, 1, 1, 1], "hidden_sizes": [32, 64, 96, 128], "embedding_size": 32, "groups_width": 16},
    "efficientnet": {"width_coefficient": 0.25, "depth_coefficient": 0.25, "hidden_dim": 320},
    "mobilenet_v1": {"depth_multiplier": 0.25},
    "mobilenet_v2": {"depth_multiplier": 0.35},
    "convnext": {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 48, 64]},
    "bit": {"depths": [1, 1, 1, 1], "hidden_sizes": [128, 128, 256, 256], "embedding_size": 64},
    "levit": {},
    "mobilevit": {"hidden_sizes": [32, 48, 64], "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 128]},
    "poolformer": {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 48, 64]},
    "swiftformer": {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 48, 64]},
    "textnet": {},
    "vit": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2},
}
# a timm or mmpretrain family whose smallest model with a BatchNorm has more parameters is left out
MAX_PARAMS = 35_000_000
# mmpretrain's conv families: folders of its configs/ (transformer-only, self-supervised and
# multimodal folders are not in the list: they hold no BatchNorm or do not build offline)
MMPRETRAIN_FAMILIES = ["conformer", "convmixer", "convnext", "convnext_v2", "cspnet", "densenet", "edgenext",
                       "efficientformer", "efficientnet", "efficientnet_v2", "hornet", "hrnet", "inception_v3",
                       "lenet", "levit", "mobilenet_v2", "mobilenet_v3", "mobileone", "mobilevit", "poolformer",
                       "regnet", "replknet", "repmlp", "repvgg", "res2net", "resnest", "resnet", "resnext",
                       "riformer", "seresnet", "shufflenet_v1", "shufflenet_v2", "tinyvit", "van", "vgg", "vig",
                       "wrn"]
ULTRALYTICS = ["yolov3-tinyu.yaml", "yolov5nu.yaml", "yolov6n.yaml", "yolov8n.yaml", "yolov8n-seg.yaml",
               "yolov8n-pose.yaml", "yolov8n-obb.yaml", "yolov8n-cls.yaml", "yolov9t.yaml", "yolov10n.yaml",
               "yolo11n.yaml", "yolo11n-seg.yaml", "yolo11n-pose.yaml", "yolo11n-obb.yaml", "yolo11n-cls.yaml",
               "rtdetr-l.yaml"]


@dataclass
class Row:
    model: str
    status: str = "not run"
    bn_before: int | None = None
    bn_reparam: int | None = None
    bn_library: int | None = None
    params_before: int | None = None
    params_reparam: int | None = None
    params_library: int | None = None
    rel_err: float | None = None
    reload_rel_err: float | None = None
    library_rel_err: float | None = None
    flops_reparam: int | None = None
    flops_library: int | None = None
    library: str = ""  # which library fuse the row compares with
    input: str = ""
    completeness: str = ""
    seconds: float = 0.0


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _leaves(v)]
    return []


def _rel(out, ref) -> float:
    a, b = _leaves(out), _leaves(ref)
    if len(a) != len(b) or not a:
        return float("nan")
    worst = 0.0
    for o, r in zip(a, b):
        if o.shape != r.shape:
            return float("nan")
        worst = max(worst, ((o.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-12)).item())
    return worst


def run_counts(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(BatchNorm ops, FLOPs) that one forward pass of `model` on `x` runs, counted on the ops
    (aten), not on the modules: a torch.fx GraphModule has traced through timm's BatchNormAct2d
    (its batch norm is an op, no BatchNorm module left) and through timm's own Linear, so module
    counts would flatter it. FLOPs as torch.utils.flop_counter counts them (conv, matmul, attention;
    a multiply-add is 2)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class BatchNormOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "batch_norm" in func.__name__:
                BatchNormOps.count += 1
            return func(*args, **(kwargs or {}))

    flops = FlopCounterMode(display=False)
    with torch.no_grad(), flops, BatchNormOps():
        model(x)
    return BatchNormOps.count, flops.get_total_flops()


def _reference(model: nn.Module, x: torch.Tensor):
    """The model's output in float64 (a copy: non-persistent buffers, e.g. TResNet's anti-aliasing
    filter, are converted too, which a float64 state dict would miss)."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


# --------------------------------------------------------------------------- zoos

def torchvision_case(name: str, work: Path, size: int):
    """(training model, checkpoint path, spec ref, input shape, library fuse or None)."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None, **({"init_weights": True} if name in (
        "googlenet", "inception_v3") else {})).eval()
    randomize_bn(model)
    ckpt = work / f"{name}.pth"  # references/classification/train.py's checkpoint
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 0,
                "args": _argparse.Namespace(model=name, lr=0.1)}, ckpt)
    shape = (1, 3, size, size) if name not in ("maxvit_t", "vit_b_16", "swin_t", "inception_v3") else None

    def fuse(m):
        from torch.fx.experimental.optimization import fuse as fx_fuse

        return fx_fuse(copy.deepcopy(m)), "torch.fx"

    return model, ckpt, f"torchvision:{name}", shape, fuse


def transformers_case(name: str, work: Path, size: int):
    import transformers

    from reparam_cli.ecosystems.transformers import build_model

    overrides = {**TRANSFORMERS.get(name, {}), "num_labels": 10}
    if name not in ("levit", "swiftformer", "textnet"):
        overrides["image_size"] = size
    model = build_model(model_type=name, **overrides).eval()
    randomize_bn(model)
    folder = work / name
    model.save_pretrained(folder)
    del transformers
    return model, folder, f"transformers:{folder}", None, None


def ultralytics_case(name: str, work: Path, size: int):
    from reparam_cli.ecosystems.ultralytics import build_model

    model = build_model(name).eval()
    randomize_bn(model)
    pt = work / f"{Path(name).stem}.pt"  # what ultralytics' trainer writes: the model pickled in float16
    torch.save({"model": copy.deepcopy(model).half(), "ema": None, "epoch": -1, "train_args": {}}, pt)
    model = model.half().float()  # what the checkpoint holds

    def fuse(m):
        return copy.deepcopy(m).fuse(verbose=False), "fuse()"

    return model, pt, "checkpoint", (1, 3, size, size), fuse


def _small_input(model: nn.Module, size: int, *args, **kwargs):
    """(1, 3, size, size) when the model runs on it, else None (the spec's default input)."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size), *args, **kwargs)
        return (1, 3, size, size)
    except Exception:  # noqa: BLE001 - fixed-resolution models (attention biases, position tables)
        return None


def _fx_fuse(model: nn.Module, labels: list[str], concrete_args: dict | None = None) -> nn.Module:
    """torch.fx's fuser on `model` where it traces (label added), else `model` (why it did not, added)."""
    from torch.fx import symbolic_trace
    from torch.fx.experimental.optimization import fuse as fx_fuse

    try:
        traced = symbolic_trace(model, concrete_args=concrete_args)
        fused = fx_fuse(traced, no_trace=True)
    except Exception as exc:  # noqa: BLE001 - data-dependent control flow, unsupported ops
        labels.append(f"fx cannot trace ({type(exc).__name__})")
        return model
    labels.append("torch.fx")
    return fused


def timm_case(name: str, work: Path, size: int):
    import timm
    from timm.utils.model import reparameterize_model

    from reparam_cli.blocks.registry import native_methods

    model = timm.create_model(name, pretrained=False).eval()
    randomize_bn(model)
    # train.py's CheckpointSaver (output/train/<run>/model_best.pth.tar)
    ckpt = work / f"{name}.pth.tar"
    torch.save({"epoch": 9, "arch": name, "optimizer": {"state": {}, "param_groups": []}, "version": 2,
                "args": _argparse.Namespace(model=name, lr=0.1, batch_size=128, epochs=10, pretrained=False),
                "state_dict": model.state_dict(), "metric": 12.5,
                "saver": {"checkpoint_files": [], "best_epoch": 9, "best_metric": 12.5, "pending": (9, 12.5)}},
               ckpt)
    shape = _small_input(model, size)

    def fuse(m):
        labels: list[str] = []
        m = copy.deepcopy(m).eval()
        if any(native_methods(x) for x in m.modules()):
            m = reparameterize_model(m)
            labels.append("timm reparameterize_model")
        m = _fx_fuse(m, labels)
        return (m if any(not x.startswith("fx cannot") for x in labels) else None), " + ".join(labels)

    return model, ckpt, f"timm:{name}", shape, fuse


def mmpretrain_case(name: str, work: Path, size: int):
    import mmengine

    from reparam_cli.ecosystems.mmpretrain import build_model

    model = build_model(name).eval()
    randomize_bn(model)
    ckpt = work / f"{name}.pth"  # mmengine's CheckpointHook (work_dirs/<run>/epoch_N.pth)
    torch.save({"meta": {"epoch": 100, "iter": 1000, "cfg": f"model = dict(type='ImageClassifier')  # {name}",
                         "seed": 0, "experiment_name": name, "time": "20261204_000000",
                         "mmengine_version": mmengine.__version__, "dataset_meta": {"classes": None}},
                "state_dict": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "param_schedulers": [], "message_hub": {"log_scalars": {}, "runtime_info": {"epoch": 100, "iter": 1000},
                                                        "resumed_keys": {"epoch": True, "iter": True}}},
               ckpt)
    shape = _small_input(model, size)

    def fuse(m):
        labels: list[str] = []
        m = copy.deepcopy(m).eval()
        for part in ("backbone", "neck", "head"):
            child = getattr(m, part, None)
            if callable(getattr(child, "switch_to_deploy", None)):
                child.switch_to_deploy()
                labels.append(f"{part}.switch_to_deploy()")
        m = _fx_fuse(m, labels, concrete_args={"data_samples": None, "mode": "tensor"})
        return (m if any(not x.startswith("fx cannot") for x in labels) else None), " + ".join(labels)

    return model, ckpt, f"mmpretrain:{name}", shape, fuse


CASES = {"torchvision": torchvision_case, "transformers": transformers_case, "ultralytics": ultralytics_case,
         "timm": timm_case, "mmpretrain": mmpretrain_case}


def _meta_build(build, cpu: bool = False) -> tuple[int, int] | str:
    """(parameters, BatchNorms) of the model `build()` makes on the meta device (with `cpu`, on the
    CPU where the meta device fails: some constructors compute on data), or why it failed."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = build()
    except Exception as exc:  # noqa: BLE001 - some constructors compute on data
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]
        if not cpu:
            return why
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build()
        except Exception as exc:  # noqa: BLE001 - the model does not build at all
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]
    return count_parameters(model), batchnorms(model)


def _cached_scan(cache: Path | None, scan) -> dict:
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text())
    found = scan()
    if cache is not None:
        cache.write_text(json.dumps(found))
    return found


def _pick(families: dict, what: str, scanned: str) -> tuple[list[str], list[str]]:
    """From {family: {model: [params, BNs] or error}}: the smallest model with a BatchNorm of each
    family (smallest first) and the header notes naming what was left out and why."""
    chosen, no_bn, too_big, unbuilt, no_model = [], [], [], [], []
    for family, models in sorted(families.items()):
        built = {m: v for m, v in models.items() if not isinstance(v, str)}
        with_bn = {m: v for m, v in built.items() if v[1]}
        # timm's test_* models exist for its own unit tests: a user's model is one of the others
        real = {m: v for m, v in with_bn.items() if not m.startswith("test_")} or with_bn
        if real:
            model = min(real, key=lambda m: real[m][0])
            if real[model][0] > MAX_PARAMS:
                too_big.append(f"{family} ({model}, {real[model][0] / 1e6:.0f} M)")
            else:
                chosen.append((real[model][0], model))
        elif built:
            no_bn.append(family)
        elif models:
            unbuilt.append(f"{family} ({next(iter(models.values()))})")
        else:
            no_model.append(family)
    notes = [f"{len(families)} {what} families scanned ({scanned}), {len(chosen)} swept (the smallest model with a "
             "BatchNorm of each)."]
    if too_big:
        notes.append(f"Left out, smallest model with a BatchNorm over {MAX_PARAMS // 1_000_000} M parameters "
                     f"(too slow for this sweep's CPU budget): {', '.join(too_big)}.")
    if no_bn:
        notes.append(f"No model with a BatchNorm (nothing for this sweep): {', '.join(no_bn)}.")
    if unbuilt:
        notes.append(f"No model could be built: {', '.join(unbuilt)}.")
    if no_model:
        notes.append(f"No image classification model registered: {', '.join(no_model)}.")
    return [m for _, m in sorted(chosen)], notes


def timm_families(cache: Path | None = None) -> dict:
    """{timm model file: {model: [parameters, BatchNorms] or why it did not build}}, every
    registered model built on the meta device."""
    def scan():
        import timm

        return {family: {name: _meta_build(lambda: timm.create_model(name, pretrained=False))
                         for name in timm.list_models(module=family)} for family in timm.list_modules()}

    return _cached_scan(cache, scan)


def mmpretrain_families(cache: Path | None = None, candidates: int = 4) -> dict:
    """{mmpretrain config folder: {model: [parameters, BatchNorms] or why it did not build}} for
    MMPRETRAIN_FAMILIES: the `candidates` image classification models of each with the fewest
    parameters by its metafile (whose figures are sometimes wrong, so they are counted), built on
    the meta device, or on the CPU where that fails (models the metafile puts over 100 M are not)."""
    def scan():
        from reparam_cli.ecosystems.mmpretrain import build_model, import_mmpretrain

        import_mmpretrain()
        from mmpretrain.apis.model import ModelHub

        ModelHub._register_mmpretrain_models()
        by_family: dict[str, list[tuple[float, str]]] = {}
        for name, info in ModelHub._models_dict.items():
            family = Path(info.config).parent.name
            tasks = {r.task for r in (info.results or [])}
            if family in MMPRETRAIN_FAMILIES and "Image Classification" in tasks:
                params = getattr(info.metadata, "parameters", None) if info.metadata else None
                by_family.setdefault(family, []).append((params or math.inf, name))
        found: dict[str, dict] = {f: {} for f in MMPRETRAIN_FAMILIES}
        for family, models in by_family.items():
            for stated, name in sorted(models)[:candidates]:
                found[family][name] = _meta_build(lambda: build_model(name), cpu=stated <= 100e6)
                print(f"scan {family}: {name} {found[family][name]}", file=sys.stderr, flush=True)
        return found

    return _cached_scan(cache, scan)


def names_for(zoo: str, all_models: bool, scan_cache: Path | None = None) -> tuple[list[str], list[str]]:
    """The zoo's list of models and the notes for the table's header."""
    if zoo == "torchvision":
        if all_models:
            import torchvision

            return sorted(torchvision.models.list_models(module=torchvision.models)), []
        return TORCHVISION, ["Not covered by this list: torchvision's detection, segmentation, video and optical-flow "
                             "builders (the `torchvision:` route builds them; `--all` sweeps every builder) and the "
                             "larger sizes of each family."]
    if zoo == "transformers":
        return list(TRANSFORMERS), ["Each model type in a small configuration from its config class (the overrides in "
                                    "scripts/zoo_sweep.py). Not covered: the other vision model types (DINOv2, Swin, "
                                    "ConvNeXtV2, HGNetV2, ...), default (full-size) configurations, and detection or "
                                    "segmentation heads. transformers has no fuse of its own: the target is 0 BatchNorm."]
    if zoo == "timm":
        return _pick(timm_families(scan_cache), "timm", "every registered model built on the meta device")
    if zoo == "mmpretrain":
        return _pick(mmpretrain_families(scan_cache), "mmpretrain", "configs/<family>/ folders; the 4 image "
                     "classification models of each its metafile says are smallest, built on the meta device or "
                     "the CPU")
    return ULTRALYTICS, ["Every task head (detect, segment, pose, obb, classify) of each YOLO generation, and RT-DETR, "
                         "in its smallest size. Not covered: the larger sizes (s/m/l/x: the same modules, more "
                         "channels); YOLO-World and YOLOE are refused in one line (their class text embeddings live outside the state "
                         "dict: not supported yet)."]


def _worst_block(report: dict) -> str:
    """' (worst block <path> <type>, rel err <e>; failed blocks: ...)' from a failed verification's
    report, else ''."""
    worst, failed = report.get("worst_block") or {}, report.get("failed_blocks") or []  # convert's --json keys
    parts = ([f"worst block {worst.get('path')} {worst.get('type')}, rel err {worst.get('max_rel_err') or 0:.1e}"]
             if worst else []) + ([f"failed blocks: {', '.join(failed[:3])}"] if failed else [])
    return f" ({'; '.join(parts)})" if parts else ""


def sweep_one(zoo: str, name: str, work: Path, size: int) -> Row:
    from reparam_cli.errors import ReparamError, VerificationFailed
    from reparam_cli.pipeline.conversion import convert_checkpoint
    from reparam_cli.pipeline.deploy import load_deploy
    from reparam_cli.pipeline.options import VerifyOptions
    from reparam_cli.pipeline.specs import load_spec

    row = Row(name)
    start = time.perf_counter()
    torch.manual_seed(0)  # the same random weights on every run of the sweep
    out = work / f"{Path(name).stem}.deploy.safetensors"
    try:
        model, ckpt, ref, shape, library_fuse = CASES[zoo](name, work, size)
        spec = load_spec(ref) if ref != "checkpoint" else ref
        shape = tuple(shape or load_spec(ref).input_shape)
        row.input = "x".join(map(str, shape[2:]))
        row.bn_before, row.params_before = batchnorms(model), count_parameters(model)
        try:
            report = convert_checkpoint(ckpt, spec, out, overwrite=True, trust_pickle=(ref == "checkpoint"),
                                        verify_options=VerifyOptions(input_shape=shape))
        except (ReparamError, VerificationFailed) as exc:  # what `reparam convert` exits non-zero on
            rep = getattr(exc, "report", None) or {}
            row.rel_err = rep.get("max_rel_err")
            worst = _worst_block(rep)
            row.status = f"reparam: {exc}{worst}"[:240]
            floor, rtol = rep.get("train_rel_err"), rep.get("rtol")
            if floor is not None and rtol is not None and floor > rtol and not rep.get("failed_blocks"):
                # Not a wrong fold: the randomly initialised model amplifies float32 rounding itself.
                row.status = (f"reparam: ill-conditioned at random init: the training model itself is {floor:.1e} off "
                              f"its float64 reference in float32 (rtol {rtol:.0e}), the deploy model "
                              f"{row.rel_err:.1e}; every block matches{worst}")[:240]
            return row
        row.rel_err, row.params_reparam = report["max_rel_err"], report["params_after"]
        row.completeness = report["completeness"][:120]
        deploy = load_deploy(out)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        row.bn_reparam, row.flops_reparam = run_counts(deploy, x)
        from reparam_cli import ecosystems

        ecosystems.prepare(model)
        ref_out = _reference(model, x)
        model.float()
        with torch.no_grad():
            row.reload_rel_err = _rel(deploy(x), ref_out)
            # the float floor on this input (the training model's own float32 error; verification's rule)
            floor = _rel(model(x), ref_out)
        theirs = None
        if library_fuse is not None:
            try:
                theirs, row.library = library_fuse(model)
            except Exception as exc:  # noqa: BLE001 - e.g. torch.fx cannot trace it
                row.library_rel_err = None
                row.status = f"library fuse failed: {type(exc).__name__}"
        if theirs is not None:
            theirs.eval()
            row.params_library = count_parameters(theirs)
            row.bn_library, row.flops_library = run_counts(theirs, x)
            with torch.no_grad():
                row.library_rel_err = _rel(theirs(x), ref_out)
        problems = []
        if row.bn_library is not None and row.bn_reparam > row.bn_library:
            problems.append(f"keeps {row.bn_reparam - row.bn_library} BN the library's fuse removes")
        if row.params_library is not None and row.params_reparam > row.params_library:
            problems.append(f"{row.params_reparam - row.params_library} more params than the library's fuse")
        if None not in (row.flops_reparam, row.flops_library) and row.flops_reparam > row.flops_library:
            problems.append(f"{row.flops_reparam - row.flops_library} more FLOPs than the library's fuse")
        if not math.isfinite(row.reload_rel_err) or row.reload_rel_err > max(1e-4, 4 * floor if floor <= 1e-2 else 0):
            problems.append(f"rebuilt file differs ({row.reload_rel_err:.2g})")
        row.status = "; ".join(problems) or ("ok" if row.status == "not run" else f"ok ({row.status})")
    except Exception as exc:  # noqa: BLE001 - the sweep goes on; the row says what broke
        row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:240]
    finally:
        row.seconds = round(time.perf_counter() - start, 1)
    return row


def markdown(zoo: str, rows: list[Row], size: int, versions: str, left_out: list[str], notes: list[str]) -> str:
    ok = sum(r.status.startswith("ok") for r in rows)
    exit0 = sum(not r.status.startswith(("reparam:", "error:")) for r in rows)
    library = {"torchvision": "torch.fx's fuser", "ultralytics": "ultralytics' `model.fuse()`",
               "transformers": "(none: transformers has no fuse)",
               "timm": "timm's `reparameterize_model` where the model has fuse methods, then torch.fx's fuser "
                       "where the model traces",
               "mmpretrain": "the backbone's (neck's, head's) `switch_to_deploy()` where it has one, then torch.fx's "
                             "fuser where the model traces"}[zoo]
    saved = {"timm": "timm train.py's checkpoint (`model_best.pth.tar`: epoch, arch, optimizer, version, args "
                     "as an argparse Namespace, state_dict, metric, saver)",
             "mmpretrain": "mmengine's checkpoint (`epoch_N.pth`: meta, state_dict, optimizer, param_schedulers, "
                           "message_hub)"}.get(zoo, "saved as its zoo saves it")
    lines = [f"# {zoo} sweep", "",
             f"Generated by `scripts/zoo_sweep.py {zoo}` ({versions}); inputs 1x3x{size}x{size} where the model "
             "takes them, else its default size (column `input`). Each model built without weights, BatchNorm "
             f"statistics randomised, {saved}, converted by reparam's CLI pipeline (`{zoo}:<model>` where the zoo has "
             "a route), the written file rebuilt; "
             f"compared with {library} (column `library`). Errors are relative to a float64 reference; the rebuilt "
             "file passes within 1e-4, or within 4x the training model's own float32 error where that is above 1e-4 "
             "(the float floor, as verification rules). BN before counts "
             "BatchNorm modules; BN reparam / library count the batch-norm ops one forward pass runs, FLOPs are "
             "torch's FlopCounterMode figures of that pass (ops, not modules: torch.fx traces through timm's "
             "BatchNormAct2d, so its graph holds no BatchNorm module but still normalises).", ""]
    lines += notes + ([""] if notes else [])
    lines += [f"**{len(rows)} models tried, {exit0} converted with exit 0, {ok} ok.**", "",
              "| model | status | input | BN before | BN reparam | BN library | params before | params reparam | "
              "params library | FLOPs reparam | FLOPs library | reparam err | rebuilt err | library err | library | "
              "report | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.status.replace('|', '/')} | {r.input or '-'} | {number_cell(r.bn_before)} | "
                     f"{number_cell(r.bn_reparam)} | {number_cell(r.bn_library)} | {number_cell(r.params_before)} | "
                     f"{number_cell(r.params_reparam)} | {number_cell(r.params_library)} | "
                     f"{number_cell(r.flops_reparam)} | {number_cell(r.flops_library)} | {number_cell(r.rel_err)} | "
                     f"{number_cell(r.reload_rel_err)} | {number_cell(r.library_rel_err)} | {r.library or '-'} | "
                     f"{r.completeness.replace('|', '/')} | {r.seconds} |")
    if left_out:
        lines += ["", "Not covered by this run: " + ", ".join(left_out) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", choices=sorted(CASES))
    ap.add_argument("--all", action="store_true", help="every model of the zoo's list (torchvision: every builder)")
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--size", type=int, default=None, help="input size (default 64; ultralytics 128)")
    ap.add_argument("--budget", type=float, default=0, help="stop starting new models after this many seconds")
    ap.add_argument("--print", action="store_true", help="print the table instead of writing docs/sweep-<zoo>.md")
    ap.add_argument("--scan-cache", type=Path, default=None,
                    help="timm/mmpretrain: JSON file keeping the meta-device scan of the families (reused when present)")
    args = ap.parse_args(argv)
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp())
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    size = args.size or (128 if args.zoo == "ultralytics" else 64)
    if args.only:
        names, notes = [n for n in args.only.split(",") if n], [f"Only the models named with `--only`: {args.only}."]
    else:
        names, notes = names_for(args.zoo, args.all, args.scan_cache)
    print(f"{len(names)} models: {', '.join(names)}", file=sys.stderr, flush=True)
    rows: list[Row] = []
    left_out: list[str] = []
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if args.budget and time.perf_counter() - begin > args.budget:
                left_out.append(name)
                continue
            rows.append(sweep_one(args.zoo, name, Path(tmp), size))
            r = rows[-1]
            print(f"{name}: {r.status} ({r.seconds} s)", file=sys.stderr, flush=True)
    import importlib.metadata as md

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("torch", args.zoo) if _has(p))
    text = markdown(args.zoo, rows, size, versions, left_out, notes)
    if args.print:
        print(text)
    else:
        (ROOT / "docs" / f"sweep-{args.zoo}.md").write_text(text)
    return 0


def _has(package: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(package)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
