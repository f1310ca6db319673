"""Every model zoo's natural route (issue 17): `torchvision:<builder>`, `transformers:<model type>` and
save_pretrained folders, unknown routes answered in one line, checkpoints as each zoo's trainers
write them (torchvision's reference scripts with their `_metadata`), ultralytics models built in
the user's own spec converting as through `ultralytics:`. Small models, small inputs."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from reparam_cli.errors import SpecError
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.pipeline.specs import load_spec

from .helpers import TINY_REPVGG_YAML, run_cli

SMALL = ["--input-shape", "1,3,64,64"]


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_unknown_route_answers_with_the_routes(tmp_path):
    with pytest.raises(SpecError) as exc:
        load_spec("torchvison:resnet18")
    text = str(exc.value) + str(exc.value.hint)
    assert "did you mean torchvision:" in text and "timm:" in text and "build_model()" in text
    assert "model_specs" not in text  # never an internal path


def test_module_callable_spec(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text("from torch import nn\n"
                                        "def small(width=4):\n"
                                        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = load_spec("mynets:small?width=8")
    assert spec.builder == "mynets:small" and spec.args == {"width": 8}
    assert spec.build(device="meta")[0].out_channels == 8


tv = pytest.importorskip("torchvision")


def test_torchvision_spec_and_suggestions():
    spec = load_spec("torchvision:resnet18?num_classes=10")
    assert spec.builder == "reparam_cli.ecosystems.torchvision:build_model"
    assert spec.args == {"name": "resnet18", "num_classes": 10} and spec.input_shape == (1, 3, 224, 224)
    assert load_spec("torchvision:r3d_18").input_shape == (1, 3, 8, 112, 112)
    with pytest.raises(SpecError) as exc:
        load_spec("torchvision:resnet81")
    assert "torchvision:resnet18" in str(exc.value.hint)
    with pytest.raises(SpecError):
        load_spec("torchvision:resnet18?weights=IMAGENET1K_V1").build(device="meta")


def test_torchvision_reference_script_checkpoint_keeps_metadata(tmp_path):
    """references/classification/train.py's checkpoint (argparse.Namespace inside) of MNASNet, whose
    layers check the state dict's `_metadata` versions: read without --trust-pickle, converted,
    the written file rebuilt."""
    model = tv.models.mnasnet0_5(num_classes=10).eval()
    with torch.no_grad():
        _randomize_bn(model)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 3,
                "args": argparse.Namespace(lr=0.1, model="mnasnet0_5")}, ckpt)
    out = tmp_path / "mnas.safetensors"
    res = run_cli("convert", ckpt, "--spec", "torchvision:mnasnet0_5?num_classes=10", "-o", out, *SMALL, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and report["max_rel_err"] < 1e-4
    deploy = load_deploy(out)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(deploy(x), model(x), rtol=1e-4, atol=1e-4)


def test_ultralytics_model_from_a_users_spec_converts_as_through_the_prefix(tmp_path, monkeypatch):
    """A DetectionModel built in the user's own spec.py (YOLOv10: end-to-end head) is put in
    ultralytics' export mode like `ultralytics:` models, so the fused head's output matches."""
    pytest.importorskip("ultralytics")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "yolo"))
    spec = tmp_path / "yolo_spec.py"
    spec.write_text('"""YOLOv10n from user code."""\nfrom ultralytics.nn.tasks import DetectionModel\n'
                    "INPUT_SHAPE = (1, 3, 64, 64)\n"
                    "def build_model():\n    return DetectionModel('yolov10n.yaml', nc=2, verbose=False)\n")
    from reparam_cli.pipeline.specs import _python_spec

    model = _python_spec(spec, "build_model").build()
    ckpt = tmp_path / "y10.pth"
    torch.save(model.state_dict(), ckpt)
    res = run_cli("convert", ckpt, "--spec", spec, "-o", tmp_path / "y10.safetensors", "--json", "--strict")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    # Fully fused: the untraceable C2f/PSA modules hold nothing left, the head's own fuse() ran.
    assert report["ok"] and report["completeness"] == "complete" and report["remaining"] == []
    kinds = {r["kind"] for r in report["skipped"]}
    assert "native-method-ran" in kinds and "untraceable" in kinds


transformers = pytest.importorskip("transformers")

HF_SMALL = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 16, 16], embedding_size=8, num_labels=3, image_size=32)


def _hf_resnet():
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(**HF_SMALL)).eval()
    with torch.no_grad():
        _randomize_bn(model)
    return model


def test_transformers_model_type_and_class_specs():
    spec = load_spec("transformers:resnet?num_labels=3&depths=[1,1,1,1]&image_size=32")
    assert spec.builder == "reparam_cli.ecosystems.transformers:build_model"
    assert spec.input_shape == (1, 3, 32, 32)
    assert type(spec.build(device="meta")).__name__ == "ResNetForImageClassification"
    assert type(load_spec("transformers:ResNetModel?depths=[1,1,1,1]").build(device="meta")).__name__ == "ResNetModel"
    with pytest.raises(SpecError) as exc:
        load_spec("transformers:resnett")
    assert "transformers:resnet" in str(exc.value.hint)


class _RunsCommand:
    """Unpickling this runs a shell command (what a hostile training_args.bin could hold)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("layout", ["single", "sharded", "trainer-bin"])
def test_transformers_folder_converts_and_rebuilds(tmp_path, layout):
    """save_pretrained folders (one safetensors file, shards with their index) and a Trainer
    checkpoint-N/ folder with pytorch_model.bin: the folder is the checkpoint and the spec."""
    model = _hf_resnet()
    folder = tmp_path / ("run/checkpoint-500" if layout == "trainer-bin" else "model")
    if layout == "sharded":
        model.save_pretrained(folder, max_shard_size="4KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(folder)
    if layout == "trainer-bin":
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "optimizer.pt").write_bytes(b"")  # what Trainer writes beside it, not read
        torch.save(_RunsCommand(str(tmp_path / "RAN")), folder / "training_args.bin")  # a pickle, never opened
    out = tmp_path / "deploy.safetensors"
    res = run_cli("convert", folder, "--spec", f"transformers:{folder}", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and report["worst_output"].startswith("output['logits']")
    deploy = load_deploy(out)  # from the configuration stored in the file
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(deploy(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "RAN").exists()
    if layout == "trainer-bin":  # the run folder itself: pointed at its checkpoints
        res = run_cli("convert", tmp_path / "run", "--spec", f"transformers:{folder}", "-o", tmp_path / "x.safetensors")
        assert res.exit_code == 2 and "checkpoint-500" in res.output


def test_transformers_legacy_key_names_are_renamed_as_from_pretrained_renames_them(tmp_path):
    """transformers 5 writes ViT under legacy key names (`encoder.layer.0.attention.attention.query`) and
    renames them when loading: the folder converts, every tensor lands where from_pretrained puts it."""
    from reparam_cli.pipeline.training import read_training_model

    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                    image_size=16, patch_size=8, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    folder = tmp_path / "vit"
    model.save_pretrained(folder)
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert saved != set(model.state_dict())  # the legacy names this test is about
    loaded, _ = read_training_model(folder, load_spec(f"transformers:{folder}"))
    ours, theirs = loaded.state_dict(), transformers.ViTForImageClassification.from_pretrained(folder).state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    out = tmp_path / "vit.safetensors"
    res = run_cli("convert", folder, "--spec", f"transformers:{folder}", "-o", out, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"], res.output
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(load_deploy(out)(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)


def test_transformers_hf_output_is_a_save_pretrained_folder(tmp_path):
    """`-f hf` writes what save_pretrained writes: from_pretrained loads it with no missing, unexpected
    or mismatched key and computes the training model's function (relative 1e-5); the conv weights
    are the fused ones and each folded BatchNorm is an exact bias-add (mean 0, var + eps == 1,
    weight 1); `reparam verify` reads the folder back. A folder to stdout and a model that is not a
    transformers PreTrainedModel are refused in one line."""
    model = _hf_resnet()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    out = tmp_path / "deployed"
    res = run_cli("convert", folder, "--spec", f"transformers:{folder}", "-f", "hf", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and report["export_runtime"] == "from_pretrained" and report["export_max_rel_err"] < 1e-5
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    loaded, info = transformers.ResNetForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = loaded.eval()(x).logits, model(x).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    conv, bn = loaded.resnet.embedder.embedder.convolution, loaded.resnet.embedder.embedder.normalization
    assert not torch.equal(conv.weight, model.resnet.embedder.embedder.convolution.weight)  # the fused weights
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) and torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.running_var + bn.eps, torch.ones_like(bn.running_var))

    res = run_cli("verify", folder, out, "--spec", f"transformers:{folder}", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["format"] == "hf" and json.loads(res.stdout)["ok"]

    res = run_cli("convert", folder, "--spec", f"transformers:{folder}", "-f", "hf", "-o", out)
    assert res.exit_code == 2 and "already exists" in res.stderr  # an existing folder needs --overwrite
    res = run_cli("convert", folder, "--spec", f"transformers:{folder}", "-f", "hf", "-o", "-")
    assert res.exit_code == 2 and "cannot go to stdout" in res.stderr and "Traceback" not in res.stderr

    other = tmp_path / "tiny.yaml"
    other.write_text(TINY_REPVGG_YAML)
    ckpt = tmp_path / "tiny.pth"
    assert run_cli("init", other, "-o", ckpt).exit_code == 0
    res = run_cli("convert", ckpt, "--spec", other, "-f", "hf", "-o", tmp_path / "tiny-hf")
    assert res.exit_code == 2 and res.stderr.count("\n") <= 2 and "not a transformers PreTrainedModel" in res.stderr
    assert not (tmp_path / "tiny-hf").exists()


def test_transformers_hf_output_sets_folded_layer_scales_to_one(tmp_path):
    """ConvNeXt: the graph pass folds each layer_scale_parameter into the pointwise conv before it;
    the -f hf folder holds the scaled weights and the scales as ones, loads with no key problem and
    computes the training model's function (relative 1e-5)."""
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_labels=3,
                                         image_size=32, layer_scale_init_value=0.5)
    model = transformers.ConvNextForImageClassification(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale_parameter"):
                p.uniform_(0.2, 2.0)
    folder, out = tmp_path / "convnext", tmp_path / "convnext-fused"
    model.save_pretrained(folder)
    res = run_cli("convert", folder, "--spec", f"transformers:{folder}", "-f", "hf", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    loaded, info = transformers.ConvNextForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    scales = [p for n, p in loaded.named_parameters() if n.endswith("layer_scale_parameter")]
    assert len(scales) == 4 and all(torch.equal(p, torch.ones_like(p)) for p in scales)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded.eval()(x).logits, model(x).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_reparam_debug_prints_the_traceback_and_keeps_the_exit_code(tmp_path, monkeypatch):
    import reparam_cli.pipeline.stdio as stdio

    def broken(*args, **kwargs):
        raise RuntimeError("an internal slip")

    monkeypatch.setattr(stdio, "convert_stdio", broken)
    ckpt = tmp_path / "x.pth"
    torch.save({"w": torch.zeros(1)}, ckpt)
    plain = run_cli("convert", ckpt, "--spec", "repvgg-a0", "-o", tmp_path / "o.safetensors")
    monkeypatch.setenv("REPARAM_DEBUG", "1")
    debug = run_cli("convert", ckpt, "--spec", "repvgg-a0", "-o", tmp_path / "o.safetensors")
    assert plain.exit_code == debug.exit_code == 2
    assert "Traceback" in debug.stderr and "an internal slip" in debug.stderr and "Traceback" not in plain.stderr


def test_float16_checkpoint_fused_from_exact_values_with_dtype_float32(tmp_path):
    """A float16 checkpoint converted with --dtype float32 is fused from its exact (widened) values
    and rounded once: exact to float32 rounding, not to float16's."""
    from reparam_cli.pipeline.specs import load_spec as load

    from .helpers import TINY_REPVGG_YAML, randomized

    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_REPVGG_YAML)
    model = randomized(load(str(spec)).build()).eval()
    ckpt = tmp_path / "half.pth"
    torch.save(model.half().state_dict(), ckpt)
    res = run_cli("convert", ckpt, "--spec", spec, "-o", tmp_path / "f32.safetensors", "--dtype", "float32", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["dtype"] == "float32" and report["checkpoint_dtype"] == "float16"
    assert report["max_rel_err"] < 1e-5  # float16 rounding of fused weights alone would be ~1e-3


AUX_SPEC = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 16, 16)


class WithAux(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 16 * 16, 4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        x = self.body(x)
        if self.training:
            return self.head(x), self.aux(x)
        return self.head(x)


def build_model():
    return WithAux()
'''


def test_unused_modules_are_dropped_unless_keep_unused(tmp_path):
    spec = tmp_path / "aux.py"
    spec.write_text(AUX_SPEC)
    ckpt = tmp_path / "aux.pth"
    assert run_cli("init", spec, "-o", ckpt).exit_code == 0
    out = tmp_path / "dropped.safetensors"
    res = run_cli("convert", ckpt, "--spec", spec, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["dropped"] == ["aux"] and any("--keep-unused" in n for n in report["notes"])
    deploy = load_deploy(out, spec=str(spec))  # the skeleton drops the same modules
    assert deploy.aux is None and report["params_after"] == sum(p.numel() for p in deploy.parameters())
    kept = tmp_path / "kept.safetensors"
    res = run_cli("convert", ckpt, "--spec", spec, "-o", kept, "--json", "--keep-unused")
    assert res.exit_code == 0 and "dropped" not in json.loads(res.stdout)
    assert load_deploy(kept, spec=str(spec)).aux is not None


LOUD_SPEC = '''
from torch import nn

INPUT_SHAPE = (1, 3, 8, 8)


def build_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
'''


def test_float16_overflow_is_named_when_verification_runs_in_float32(tmp_path):
    """A float16 checkpoint converted with --dtype float32 whose activations exceed 65504 on the
    verification input: the conversion passes (float32 holds them) and the report names where the
    model run in float16 would give inf (a note); a checkpoint that stays in range gets no such note."""
    spec = tmp_path / "loud.py"
    spec.write_text(LOUD_SPEC)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2)).eval()
    with torch.no_grad():
        _randomize_bn(model)
        model[1].weight.fill_(2.0)
        model[3].weight.uniform_(0.5, 1.0)
        model[4].weight.fill_(30000.0)  # the second conv's output scaled past float16's range (~1e5)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(x).abs().max() > 65504 and model[:4](x).abs().max() < 65504
    results = {}
    for name, scale in (("loud", 1.0), ("quiet", 1e-3)):
        with torch.no_grad():
            model[4].weight.mul_(scale)
        ckpt = tmp_path / f"{name}.pth"
        torch.save(model.half().state_dict(), ckpt)
        model.float()
        res = run_cli("convert", ckpt, "--spec", spec, "--dtype", "float32", "-o", tmp_path / f"{name}.safetensors",
                      "--json")
        assert res.exit_code == 0, res.output
        results[name] = json.loads(res.stdout)
    loud = [n for n in results["loud"].get("notes", []) if "float16's range" in n]
    assert results["loud"]["ok"] and results["loud"]["dtype"] == "float32" and len(loud) == 1
    assert "first at 3" in loud[0] and "gives inf" in loud[0], loud[0]  # the folded conv+BN: model.3 after fusing
    assert not [n for n in results["quiet"].get("notes", []) if "float16's range" in n]


LIGHTNING_MODULES = {  # stand-ins for the classes a Lightning + user-config checkpoint pickles
    "lightning/__init__.py": "",
    "lightning/fabric/__init__.py": "",
    "lightning/fabric/utilities/__init__.py": "",
    "lightning/fabric/utilities/data.py": "class AttributeDict(dict):\n"
                                          "    def __getattr__(self, key):\n        return self[key]\n",
    "myproject_zoo3/__init__.py": "",
    "myproject_zoo3/config.py": "import dataclasses\n\n@dataclasses.dataclass\nclass TrainConfig:\n"
                                "    lr: float = 0.1\n    width: int = 8\n\n"
                                "class Hook:\n    def __init__(self, path):\n        self.path = path\n"
                                "    def __reduce__(self):\n        import os\n"
                                "        return (os.system, ('touch ' + self.path,))\n",
}


def test_lightning_checkpoint_with_its_classes_converts_without_running_its_pickle(tmp_path, monkeypatch):
    """A checkpoint as Lightning's trainer writes it (`state_dict` with the LightningModule's `model.`
    prefix and a loss module's tensors beside it, `hyper_parameters` as Lightning's AttributeDict
    holding the user's config dataclass, `callbacks` with tensors, `loops`, `optimizer_states`,
    `lr_schedulers`), read with neither Lightning nor the user's package importable: converts
    without --trust-pickle, runs none of its code (an object whose unpickling would run a command
    stays inert), and equals the training model (relative 1e-5)."""
    import sys

    from .helpers import TINY_REPVGG_YAML, randomized

    pkg = tmp_path / "site"
    for rel, text in LIGHTNING_MODULES.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.syspath_prepend(str(pkg))
    from lightning.fabric.utilities.data import AttributeDict
    from myproject_zoo3.config import Hook, TrainConfig

    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_REPVGG_YAML)
    model = randomized(load_spec(str(spec)).build(), seed=3)
    marker = tmp_path / "RAN"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["criterion.weight"] = torch.ones(10)
    checkpoint = {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0", "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
            "monitor": "val_loss", "best_model_score": torch.tensor(0.25), "best_model_path": "/runs/epoch=3.ckpt",
            "kth_value": torch.tensor(float("inf"))}},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}],
        "lr_schedulers": [{"last_epoch": 3, "_last_lr": [0.1]}],
        "hparams_name": "kwargs",
        "hyper_parameters": AttributeDict(cfg=TrainConfig(lr=0.01), on_load=Hook(str(marker))),
    }
    ckpt = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(checkpoint, ckpt)
    for name in [m for m in sys.modules if m.split(".")[0] in ("lightning", "myproject_zoo3")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(pkg)])  # neither package importable now

    out = tmp_path / "lit.safetensors"
    res = run_cli("convert", ckpt, "--spec", spec, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    notes = " ".join(report["notes"])
    assert report["ok"] and "'model.'" in notes and "criterion.weight" in notes
    assert "hyper_parameters (lightning.fabric.utilities.data.AttributeDict)" in notes and "no code run" in notes, notes
    assert not marker.exists() and "lightning" not in sys.modules
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.double()(x.double())
        got = load_deploy(out)(x).double()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize("where", ["beside-spec", "cwd"])
def test_python_spec_imports_the_users_package_as_their_script_does(tmp_path, monkeypatch, where):
    """spec.py does `from <pkg>.nets import small` like the user's train.py: the package is found
    beside spec.py (the script's folder) or in the working directory, with neither on sys.path
    before (as under the installed `reparam` script), also for imports inside build_model(); both
    leave sys.path again afterwards (the user's folder shadows nothing reparam imports later)."""
    import sys

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    pkg_name = f"zoo3pkg_{where.replace('-', '_')}"
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    home = project if where == "beside-spec" else elsewhere
    (home / pkg_name).mkdir()
    (home / pkg_name / "__init__.py").write_text("")
    (home / pkg_name / "nets.py").write_text("from torch import nn\n"
                                             "def small(width):\n"
                                             "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width))\n")
    (home / pkg_name / "late.py").write_text("WIDTH = 6\n")
    (project / "spec.py").write_text(f"from {pkg_name}.nets import small\n\n"
                                     "def build_model():\n"
                                     f"    from {pkg_name}.late import WIDTH  # imported when built\n"
                                     "    return small(WIDTH)\n")
    monkeypatch.chdir(elsewhere)  # where the user runs reparam from
    for name in [m for m in sys.modules if m.startswith(pkg_name)]:
        monkeypatch.delitem(sys.modules, name)
    model = load_spec(str(project / "spec.py")).build(device="meta")
    assert model[0].out_channels == 6 and type(model).__module__ == "torch.nn.modules.container"
    assert sys.modules[f"{pkg_name}.nets"].__file__ == str(home / pkg_name / "nets.py")
    assert str(project) not in sys.path and str(elsewhere) not in sys.path
    for name in [m for m in sys.modules if m.startswith(pkg_name)]:
        monkeypatch.delitem(sys.modules, name)
