"""ultralytics models (YOLOv8, YOLO11, YOLOv9, YOLOv10, RT-DETR) convert, verified, from the command
line, equal to ultralytics' own `model.fuse()`.

Models are built from ultralytics' YAMLs with random weights and randomised BatchNorm statistics
(nothing is downloaded; YOLO_CONFIG_DIR points at a temporary folder), saved the way ultralytics
saves them (a `.pt` holding the pickled float16 model under `model`, beside `train_args` ...) and as
a plain state dict `.pth`. Verification runs on 1x3x64x64 inputs to keep the suite fast. RT-DETR
uses tests/data/rtdetr-tiny.yaml: rtdetr-l's blocks at a fraction of its 33M parameters.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-config-"))
pytest.importorskip("ultralytics")

from ultralytics.nn.modules import Conv, Conv2, ConvTranspose, Detect, RepConv, RepVGGDW  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel  # noqa: E402

from reparam_cli.pipeline.deploy import load_deploy  # noqa: E402
from reparam_cli.core.tensors import count_parameters
from reparam_cli.convert.engine import reparameterize  # noqa: E402
from reparam_cli.errors import SpecError  # noqa: E402
from reparam_cli.core.tensors import randomize_batchnorm  # noqa: E402
from reparam_cli.pipeline.specs import load_spec  # noqa: E402

from .helpers import run_cli  # noqa: E402

RTDETR_TINY = str(Path(__file__).parent / "data" / "rtdetr-tiny.yaml")
SHAPE = "1,3,64,64"
# (YAML, the blocks its conversion must find)
MODELS = {
    "yolov8n": ("yolov8n.yaml", {"Conv"}),
    "yolo11n": ("yolo11n.yaml", {"Conv"}),
    "yolov9t": ("yolov9t.yaml", {"Conv", "RepConv"}),  # RepNCSPELAN4's RepConvN
    "yolov10n": ("yolov10n.yaml", {"Conv", "RepVGGDW"}),
    "rtdetr": (RTDETR_TINY, {"Conv", "RepConv"}),  # RepC3
}


def _build(cfg: str, seed: int = 0) -> nn.Module:
    """The model as `YOLO(cfg).model` builds it, with randomised BN statistics, in eval mode."""
    torch.manual_seed(seed)
    cls = RTDETRDetectionModel if "rtdetr" in cfg else DetectionModel
    model = cls(cfg, verbose=False)
    with torch.no_grad():
        randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


def _ultralytics_fused(model: nn.Module) -> nn.Module:
    """ultralytics' own fuse() of a copy, heads in export mode (what reparam's specs build)."""
    fused = copy.deepcopy(model).fuse(verbose=False)
    for m in fused.modules():
        if hasattr(m, "export"):
            m.export = True
    return fused.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _outputs_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    assert a.shape == b.shape
    err = (a.double() - b.double()).abs().max().item() / b.double().abs().max().item()
    assert err < rtol, f"relative difference {err:.3g}"


def _convert(*args):
    result = run_cli("convert", *args, "--input-shape", SHAPE, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    """(name, model, the `.pt` ultralytics writes, a state-dict `.pth`) for one model."""
    name = request.param
    cfg = MODELS[name][0]
    model = _build(cfg)
    folder = tmp_path_factory.mktemp(name)
    pt, pth = folder / f"{name}.pt", folder / f"{name}.pth"
    # As ultralytics' trainer saves best.pt once stripped: the float16 model under "model", no EMA left.
    torch.save({"date": "2026-01-01", "version": "8.4", "epoch": -1, "best_fitness": None,
                "model": copy.deepcopy(model).half(), "ema": None, "optimizer": None,
                "train_args": {"model": cfg, "imgsz": 64}}, pt)
    torch.save(model.state_dict(), pth)
    return name, model, pt, pth


def test_pickled_checkpoint_converts_verified_equal_to_ultralytics_fuse(saved):
    """`--trust-pickle --spec checkpoint` on ultralytics' .pt: verified, no BatchNorm left, every
    re-parameterizable block fused, the same parameter count and outputs as ultralytics' fuse(),
    and the deploy file reloads (from its stored spec alone) to the verified function."""
    name, _, pt, _ = saved
    out = pt.with_suffix(".deploy.safetensors")
    report = _convert(pt, "--spec", "checkpoint", "--trust-pickle", "-o", out)
    assert report["ok"] and report["verified"] and report["max_rel_err"] < 1e-5
    assert set(report["blocks"]) == MODELS[name][1]
    assert any("stored in float16" in n for n in report["notes"])
    assert any("load_deploy rebuilds it" in n for n in report["notes"])

    # ultralytics loads its checkpoints in float32: the reference is its own fuse() of that model.
    loaded = torch.load(pt, weights_only=False)["model"].float().eval()
    theirs = _ultralytics_fused(loaded)
    deploy = load_deploy(out)
    assert _batchnorms(deploy) == 0
    assert not any(isinstance(m, (RepConv, RepVGGDW)) and hasattr(m, "conv1") for m in deploy.modules())
    if name == "rtdetr":  # reparam also folds the decoder's input_proj conv+BN that ultralytics keeps
        kept = sum(m.num_features for m in theirs.modules() if isinstance(m, nn.BatchNorm2d))
        assert count_parameters(deploy) == count_parameters(theirs) - kept  # 2 BN params out, 1 bias in
    else:
        assert _batchnorms(theirs) == 0
        assert count_parameters(deploy) == count_parameters(theirs)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _outputs_close(deploy(x), theirs(x))


def test_state_dict_converts_with_ultralytics_spec(saved):
    """A plain state dict with `--spec ultralytics:<yaml>`: built on the CPU (noted), verified, and
    the deploy file reloads to the same function as the training model."""
    name, model, _, pth = saved
    cfg = MODELS[name][0]
    out = pth.with_name(f"{name}-pth.deploy.safetensors")
    report = _convert(pth, "--spec", f"ultralytics:{cfg}", "-o", out)
    assert report["ok"] and report["verified"] and report["max_rel_err"] < 1e-5
    assert any(n.startswith("built on cpu:") for n in report["notes"])
    deploy = load_deploy(out)
    assert _batchnorms(deploy) == 0
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    train = copy.deepcopy(model).double()
    for m in train.modules():
        if hasattr(m, "export"):
            m.export = True
    with torch.no_grad():
        _outputs_close(deploy(x), train(x.double()))


def test_torchscript_export_runs_without_reparam(tmp_path):
    """The fused YOLOv8n (forward swapped for forward_fuse) traces to TorchScript, checked by reparam
    against the deploy model before it is written; the file runs on its own."""
    model = _build("yolov8n.yaml", seed=1)
    pth = tmp_path / "v8.pth"
    torch.save(model.state_dict(), pth)
    out = tmp_path / "v8.deploy.pt"
    report = _convert(pth, "--spec", "ultralytics:yolov8n.yaml", "-f", "torchscript", "-o", out)
    assert report["ok"] and report["export_ok"] and report["export_max_rel_err"] < 1e-5
    scripted = torch.jit.load(str(out))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _outputs_close(scripted(x), _ultralytics_fused(model)(x))


def test_pickled_checkpoint_needs_trust_pickle_only_as_its_own_spec(tmp_path):
    """`--spec checkpoint` runs the pickled model's code: only with --trust-pickle. With the model's
    spec, the restricted unpickler reads the pickled module's tensors without running any code."""
    model = _build("yolov8n.yaml")
    pt = tmp_path / "best.pt"
    torch.save({"model": copy.deepcopy(model).half(), "ema": None, "train_args": {}}, pt)
    result = run_cli("convert", pt, "--spec", "checkpoint", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trust-pickle" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()

    out = tmp_path / "v8.deploy.safetensors"
    report = _convert(pt, "--spec", "ultralytics:yolov8n.yaml", "--dtype", "float32", "-o", out)
    assert report["ok"] and report["verified"] and report["checkpoint_dtype"] == "float16"
    deploy, theirs = load_deploy(out), _ultralytics_fused(model.half().float())
    assert _batchnorms(deploy) == 0 and count_parameters(deploy) == count_parameters(theirs)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _outputs_close(deploy(x), theirs(x))


def test_spec_references():
    spec = load_spec("ultralytics:yolov8n.yaml?nc=3")
    assert spec.args == {"cfg": "yolov8n.yaml", "nc": 3} and spec.input_shape == (1, 3, 640, 640)
    assert load_spec("ultralytics:yolov8n.yaml?ch=1").input_shape == (1, 1, 640, 640)
    with pytest.raises(SpecError, match="unknown arguments"):
        load_spec("ultralytics:yolov8n.yaml?pretrained=1")
    with pytest.raises(SpecError, match="names no ultralytics model"):
        load_spec("ultralytics:")
    result = run_cli("inspect", "--spec", "ultralytics:no-such-model.yaml", __file__)
    assert result.exit_code == 2 and "Traceback" not in result.stderr


def test_yaml_spec_builder_and_meta_fallback(tmp_path):
    """`builder: reparam_cli.ecosystems.ultralytics:build_model` in a YAML spec is the same model;
    building it on meta (where ultralytics' construction cannot run) falls back to the CPU, noted."""
    spec_file = tmp_path / "v8-3.yaml"
    spec_file.write_text("builder: reparam_cli.ecosystems.ultralytics:build_model\n"
                         "args: {cfg: yolov8n.yaml, nc: 3}\ninput_shape: [1, 3, 64, 64]\n")
    spec = load_spec(str(spec_file))
    model = spec.build(device="meta")
    assert model.yaml["nc"] == 3 and model.model[-1].export
    assert next(model.parameters()).device.type == "cpu"
    assert spec.notes and spec.notes[0].startswith("built on cpu: ultralytics models probe their strides")


def test_input_model_untouched_and_forward_swapped():
    """The deploy Conv swaps forward for forward_fuse (as ultralytics' fuse does) on a copy: the
    training model keeps its BatchNorms, its forward and its detection head."""
    model = _build("yolov10n.yaml")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy, report = reparameterize(model)
    assert report.blocks["RepVGGDW"] == 1
    assert _batchnorms(model) > 0 and all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    convs = [m for m in deploy.modules() if isinstance(m, Conv)]
    assert convs and all(m.forward.__func__ is Conv.forward_fuse and not hasattr(m, "bn") for m in convs)
    head, head_before = deploy.model[-1], model.model[-1]
    assert isinstance(head, Detect) and head is not head_before
    # fuse() drops the branch the head does not use; the training head keeps both
    assert (head.cv2 is None) != (head.one2one_cv2 is None)
    assert head_before.cv2 is not None and head_before.one2one_cv2 is not None
    model.end2end = True  # NMS-free inference: the one-to-one branch is the one kept
    head = reparameterize(model)[0].model[-1]
    assert head.cv2 is None and head.one2one_cv2 is not None


@pytest.mark.parametrize("make", [
    lambda: Conv2(8, 16, 3, 1),  # a 3x3 and a 1x1 into one BN
    lambda: Conv2(8, 8, 3, 2, g=2),
    lambda: ConvTranspose(8, 6, 2, 2),
    lambda: RepConv(8, 8, bn=True),  # with the identity BN branch
    lambda: RepConv(8, 16, s=2, g=2),
], ids=["conv2", "conv2-g2-s2", "convtranspose", "repconv-id", "repconv-s2-g2"])
def test_block_recipes_match_ultralytics(make):
    """Conv2, ConvTranspose and RepConv (not all in the YAMLs above): the recipe gives the deploy
    block ultralytics' own fusion gives (same keys), equal in float64 and to float32 rounding."""
    from ultralytics.nn.tasks import BaseModel

    torch.manual_seed(0)
    block = make().eval()
    with torch.no_grad():
        randomize_batchnorm(block, torch.Generator().manual_seed(0))
    holder = BaseModel()
    holder.model = nn.Sequential(copy.deepcopy(block))
    theirs = holder.fuse(verbose=False).model[0]
    deploy, report = reparameterize(block)
    assert report.blocks == {type(block).__name__: 1} and _batchnorms(deploy) == 0
    assert deploy.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        ref = copy.deepcopy(block).double()(x.double())
        _outputs_close(deploy(x), ref, rtol=1e-6)
        _outputs_close(theirs(x), ref, rtol=1e-5)
    assert "bn" in block._modules or isinstance(block, RepConv)  # the training block is untouched


def test_already_fused_model_is_refused(tmp_path):
    """A model ultralytics already fused (no BatchNorm left) is not a training checkpoint: one line."""
    pt = tmp_path / "fused.pt"
    torch.save({"model": _build("yolov8n.yaml").fuse(verbose=False).half(), "ema": None}, pt)
    result = run_cli("convert", pt, "--spec", "checkpoint", "--trust-pickle", "--input-shape", SHAPE)
    assert result.exit_code == 2 and "already fused" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_torchvision_layers_download_nothing(monkeypatch, tmp_path):
    """yolo11-cls-resnet18.yaml wraps a torchvision ResNet whose weights default to a download:
    reparam builds it with weights=None (they come from the checkpoint)."""
    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights either
    model = load_spec("ultralytics:yolo11n-cls-resnet18.yaml?nc=5").build()
    assert model.yaml["backbone"][0][3][2] is None


def test_stored_builder_is_known_data():
    from reparam_cli import ecosystems
    from reparam_cli.ecosystems import ultralytics as eco

    assert ecosystems.library_of_builder(eco.BUILDER) == "ultralytics"
    assert ecosystems.library_of_builder("os:system") is None


def test_find_module_follows_ultralytics_layouts():
    """best.pt keeps the model under `model` (`ema` None); last.pt, mid-training, under `ema`
    (`model` None); --ema asks for the EMA copy, which best.pt no longer has."""
    from reparam_cli.io.checkpoint import find_module
    from reparam_cli.errors import CheckpointError

    net = nn.Conv2d(1, 1, 1)
    assert find_module({"model": net, "ema": None, "train_args": {}})[:2] == (net, ["model"])
    assert find_module({"model": None, "ema": net, "updates": 3})[:2] == (net, ["ema"])
    both = find_module({"model": net, "ema": nn.Conv2d(1, 1, 1)})
    assert both[:2] == (net, ["model"]) and "--ema" in both[2][0]
    with pytest.raises(CheckpointError, match="holds no EMA model"):
        find_module({"model": net, "ema": None}, ema=True)
    with pytest.raises(CheckpointError, match="holds no pickled model"):
        find_module({"model": net.state_dict()})


def test_no_verify_conversion_keeps_deploy_weights(tmp_path):
    """Without verification the engine frees each training block once fused: the deploy blocks must
    own their tensors (a PReLU activation, a ConvTranspose without BN) and still compute the same."""
    torch.manual_seed(0)
    holder = nn.Sequential(Conv(3, 4, 3, act=nn.PReLU(4)), ConvTranspose(4, 4, bn=False)).eval()
    with torch.no_grad():
        randomize_batchnorm(holder, torch.Generator().manual_seed(0))
        holder[0].act.weight.uniform_(0.1, 0.5)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = holder(x)
        deploy, _ = reparameterize(holder, consume=True)
        _outputs_close(deploy(x), ref)


def test_ultralytics_spec_without_the_package(monkeypatch):
    """Without ultralytics installed, an `ultralytics:` spec is one clear error naming the extra."""
    from reparam_cli import ecosystems

    import importlib

    real = importlib.import_module

    def missing(name, *args, **kwargs):  # reparam's ultralytics file as if ultralytics were not installed
        if name == "reparam_cli.ecosystems.ultralytics":
            raise ModuleNotFoundError("No module named 'ultralytics'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(SpecError, match=r"needs the ultralytics package.*pip install ultralytics"):
        ecosystems.spec_for("ultralytics:yolov8n.yaml")


def test_a_stored_ultralytics_configuration_runs_no_code(tmp_path, monkeypatch):
    """The YAML configuration stored in a deploy file is data: ultralytics' parser would eval() its
    `activation`, so reparam builds in ultralytics' restricted mode, and a crafted one runs nothing."""
    from .helpers import restamp

    model = _build("yolov8n.yaml")
    pth = tmp_path / "v8.pth"
    torch.save(model.state_dict(), pth)
    good = tmp_path / "v8.deploy.safetensors"
    assert _convert(pth, "--spec", "ultralytics:yolov8n.yaml", "--no-verify", "-o", good)["ok"]
    marker = tmp_path / "MARKER"
    monkeypatch.chdir(tmp_path)  # a relative marker: the payload passes the stored spec's data check
    config = copy.deepcopy(model.yaml)
    config["activation"] = "__import__('os').system('touch MARKER')"
    crafted = restamp(good, tmp_path / "evil.deploy.safetensors", args={"cfg": config})
    with pytest.raises(Exception, match="activation|permitted|literal"):
        load_deploy(crafted)
    result = run_cli("inspect", crafted)
    assert result.exit_code == 2 and not marker.exists()


@pytest.mark.parametrize("cfg, head", [("yolov8s-worldv2.yaml", "WorldDetect"), ("yoloe-v8s-seg.yaml", "YOLOESegment"),
                                       ("yoloe-11s.yaml", "YOLOEDetect")])
def test_yolo_world_and_yoloe_are_refused_in_one_line(cfg, head, tmp_path):
    """Their class text embeddings live outside the state dict: refused up front, not half converted."""
    with pytest.raises(SpecError, match=f"YOLO-World and YOLOE models \\({head} head\\) are not supported yet"):
        load_spec(f"ultralytics:{cfg}").build()
    result = run_cli("init", f"ultralytics:{cfg}", "-o", tmp_path / "w.pth")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "w.pth").exists()


@pytest.mark.parametrize("cfg, route, dynamic", [("yolov8n.yaml", "checkpoint", "auto"),
                                                 ("yolov8n-seg.yaml", "spec", "none")])
def test_onnx_export_carries_ultralytics_metadata_and_runs_in_yolo(cfg, route, dynamic, tmp_path):
    """An ONNX file from the ultralytics route carries the metadata_props ultralytics' own exporter
    writes, so `YOLO('deploy.onnx').predict(image)` runs it with the model's task, class names and
    stride; its raw outputs (one for detect; predictions and mask prototypes for segment) equal
    ultralytics' own fuse() of the model, in onnxruntime, to float32 rounding (rtol 1e-4).
    Dynamic height/width is ultralytics' dynamic=True; static shapes give dynamic=False and the
    exported imgsz, which the predictor then letterboxes to."""
    import ast

    import numpy as np
    import onnx
    import onnxruntime as ort
    from ultralytics import YOLO
    from ultralytics.nn.tasks import SegmentationModel

    torch.manual_seed(0)
    model = (SegmentationModel if "seg" in cfg else DetectionModel)(cfg, nc=2, verbose=False)
    with torch.no_grad():
        randomize_batchnorm(model, torch.Generator().manual_seed(0))
    model.names = {0: "cat", 1: "dog"}
    model.eval()
    task = "segment" if "seg" in cfg else "detect"
    if route == "checkpoint":  # as ultralytics' trainer saves best.pt: the pickled float16 model
        src = tmp_path / "best.pt"
        torch.save({"model": copy.deepcopy(model).half(), "ema": None, "train_args": {"imgsz": 64}}, src)
        args = ("--spec", "checkpoint", "--trust-pickle")
        names = {0: "cat", 1: "dog"}
        model = torch.load(src, weights_only=False)["model"].float().eval()  # as ultralytics loads it
    else:  # a state dict: the class names are not in it, ultralytics' defaults are written
        src = tmp_path / "seg.pth"
        torch.save(model.state_dict(), src)
        args = ("--spec", f"ultralytics:{cfg}?nc=2")
        names = {0: "0", 1: "1"}
    out = tmp_path / "deploy.onnx"
    report = _convert(src, *args, "-f", "onnx", "--dynamic-shapes", dynamic, "-o", out)
    assert report["ok"] and report["export_ok"] and "names" in report["export_metadata"]

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["task"] == task and ast.literal_eval(meta["names"]) == names and int(meta["stride"]) == 32
    assert ast.literal_eval(meta["imgsz"]) == [64, 64] and meta["head"] == ("Segment" if task == "segment" else "Detect")
    assert ast.literal_eval(meta["args"])["dynamic"] is (dynamic == "auto")

    yolo = YOLO(str(out))
    assert yolo.task == task
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    results = yolo.predict(image, conf=0.0, verbose=False)
    assert len(results) == 1 and results[0].names == names and results[0].orig_shape == (48, 80)
    assert len(results[0].boxes) > 0  # conf=0: every kept box is a detection
    if task == "segment":
        assert results[0].masks is not None and results[0].masks.data.shape[0] == len(results[0].boxes)

    theirs = _ultralytics_fused(model)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = theirs(x)
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    assert len(outputs) == len(expected) == (2 if task == "segment" else 1)
    for got, want in zip(outputs, expected):
        _outputs_close(torch.from_numpy(got), want, rtol=1e-4)
