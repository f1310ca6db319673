"""Spec references: built-in names, YAML files, Python files; clear errors."""

from __future__ import annotations

import pytest

from reparam_cli.errors import SpecError
from reparam_cli.core.spec import ModelSpec, parse_shape
from reparam_cli.pipeline.specs import builtin_names, load_spec


def test_builtin_spec():
    spec = load_spec("repvgg-a0")
    assert spec.input_shape == (1, 3, 224, 224) and spec.builder.endswith(":RepVGG")
    assert "repvgg-a0" in builtin_names()


def test_yaml_file_spec(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("builder: reparam_cli.blocks.repvgg:RepVGG\n"
                    "args: {num_blocks: [1, 1, 1, 1], width_multiplier: [0.25, 0.25, 0.25, 0.25], num_classes: 5}\n"
                    "input_shape: [2, 3, 32, 32]\ncheckpoint: {key: ema, strip_prefix: net.}\n")
    spec = load_spec(str(path))
    assert spec.name == "tiny" and spec.input_shape == (2, 3, 32, 32) and spec.checkpoint["key"] == "ema"
    assert spec.build().linear.out_features == 5
    assert ModelSpec.from_json(spec.to_json()).args == spec.args


def test_python_file_spec(tmp_path):
    path = tmp_path / "my.net.py"
    path.write_text('"""A tiny test net."""\nimport torch.nn as nn\nINPUT_SHAPE = (1, 2, 8, 8)\n'
                    "def build_model():\n    return nn.Conv2d(2, 2, 3)\n"
                    "def other():\n    return nn.Conv2d(2, 4, 1)\n")
    spec = load_spec(str(path))
    assert spec.input_shape == (1, 2, 8, 8) and spec.build().out_channels == 2
    assert spec.description == "A tiny test net."
    assert load_spec(f"{path}:other").build().out_channels == 4


@pytest.mark.parametrize("ref,match", [
    ("repvgg-q7", "unknown spec"),
    ("nothere.yaml", "not found"),
    ("nothere.py", "not found"),
])
def test_spec_errors(ref, match):
    with pytest.raises(SpecError, match=match):
        load_spec(ref)


def test_bad_yaml_and_builders(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("builder: nope.module:fn\nwat: 1\n")
    with pytest.raises(SpecError, match="unknown keys: wat"):
        load_spec(str(bad))
    bad.write_text("builder: nope.module:fn\n")
    with pytest.raises(SpecError, match="cannot import nope.module"):
        load_spec(str(bad)).build()
    bad.write_text("builder: reparam_cli.blocks.repvgg:RepVGG\nargs: {bogus: 1}\n")
    with pytest.raises(SpecError, match="rejected its arguments"):
        load_spec(str(bad)).build()


def test_parse_shape():
    assert parse_shape("1,3,64,64") == parse_shape("1x3x64x64") == (1, 3, 64, 64)
    with pytest.raises(SpecError):
        parse_shape("1,a")


def test_meta_build_falls_back_to_cpu_with_a_note(tmp_path):
    """A builder whose construction computes (`.item()`, as ultralytics' stride probing) cannot run
    on meta: it is built on the CPU, the spec's notes say why, and a conversion reports the note."""
    import torch

    from reparam_cli.pipeline.conversion import convert_checkpoint

    spec_file = tmp_path / "probing.py"
    spec_file.write_text(
        "import torch\nfrom reparam_cli.blocks.repvgg import RepVGGBlock\nINPUT_SHAPE = (1, 4, 8, 8)\n"
        "def build_model():\n"
        "    block = RepVGGBlock(4, 4)\n"
        "    block.probed = block(torch.zeros(1, 4, 8, 8)).sum().item()  # real computation while building\n"
        "    return block\n")
    spec = load_spec(str(spec_file))
    model = spec.build(device="meta")
    assert next(model.parameters()).device.type == "cpu"
    assert len(spec.notes) == 1 and spec.notes[0].startswith("built on cpu: building on the meta device failed: ")
    assert "item()" in spec.notes[0]  # torch's own reason, e.g. "Tensor.item() cannot be called on meta tensors"
    ckpt = tmp_path / "probing.pth"
    torch.save(model.state_dict(), ckpt)
    report = convert_checkpoint(ckpt, str(spec_file))
    assert report["ok"] and report["notes"] == spec.notes
