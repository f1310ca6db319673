"""The shipped demo: a trained DigitsNet (examples/) converts, verifies and classifies the held-out
digits exactly as before; scripts/demo.py prints the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from reparam_cli.errors import SpecError
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.models.digits import DigitsNet
from reparam_cli.pipeline.conversion import convert_checkpoint, verify_checkpoint
from reparam_cli.pipeline.training import load_training_model
from reparam_cli.pipeline.specs import load_spec

from .helpers import assert_equivalent, randomized

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "examples" / "digits-repvgg.safetensors"
SPEC = ROOT / "examples" / "digits-repvgg.yaml"
DATA = ROOT / "examples" / "digits-test.npz"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "digits-repvgg.deploy.safetensors"
    return out, convert_checkpoint(CKPT, str(SPEC), out)


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(DATA, allow_pickle=False) as data:
        return torch.from_numpy(data["images"]), torch.from_numpy(data["labels"])


def test_shipped_files_are_small_and_consistent(test_split):
    assert sum(p.stat().st_size for p in (CKPT, SPEC, DATA)) < 2 * 2**20
    images, labels = test_split
    assert images.dtype == torch.float32 and images.shape[1:] == (1, 8, 8) and len(images) == len(labels)
    assert 0 <= images.min() and images.max() <= 1
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    spec = load_spec(str(SPEC))
    assert spec.builder == "reparam_cli.models.digits:DigitsNet" and spec.input_shape == (1, 1, 8, 8)


def test_shipped_checkpoint_converts_and_verifies(deployed):
    out, report = deployed
    assert report["ok"] and report["verified"] and report["blocks"] == {"RepVGGBlock": 5}
    assert report["params_after"] < report["params_before"]
    assert report["max_rel_err"] < 1e-5  # float32 rounding, far below the 1e-4 tolerance
    again = verify_checkpoint(CKPT, out, str(SPEC))
    assert again["ok"] and again["max_rel_err"] < 1e-5


@torch.inference_mode()
def test_training_and_deploy_forms_classify_the_test_split_identically(deployed, test_split):
    out, _ = deployed
    images, labels = test_split
    train = load_training_model(CKPT, load_spec(str(SPEC)))
    deploy = load_deploy(out)  # rebuilt from the file's own spec
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    lt, ld = train(images), deploy(images)
    assert torch.equal(lt.argmax(1), ld.argmax(1))
    assert (lt - ld).abs().max() <= 1e-5 * lt.abs().max()
    accuracy = (lt.argmax(1) == labels).double().mean().item()
    assert accuracy >= 0.95
    # The checkpoint records the accuracy training measured on this very split.
    with safe_open(str(CKPT), framework="pt") as f:
        recorded = float(f.metadata()["test_accuracy"])
    assert accuracy == pytest.approx(recorded, abs=0.5 / len(labels))


def test_demo_script_prints_the_figures(deployed, tmp_path):
    out, report = deployed
    figures_path = tmp_path / "demo.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--deploy", str(out), "--repeats", "5",
                           "--json", str(figures_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(figures_path.read_text())
    n = figures["test_samples"]
    assert figures["predictions_differ"] == 0 and figures["same_mistakes"]
    assert figures["accuracy_train"] == figures["accuracy_deploy"] >= 0.95
    assert figures["params_train"] == report["params_before"] and figures["params_deploy"] == report["params_after"]
    assert figures["latency_median_us_train"] > 0 and figures["latency_median_us_deploy"] > 0
    text = proc.stdout
    for fragment in ("accuracy", f"({figures['correct_train']}/{n})", "parameters", f"{report['params_before']:,}",
                     f"{report['params_after']:,}", "latency, batch 1", "µs", "faster",
                     f"predictions that differ: 0 of {n}", "largest logit difference"):
        assert fragment in text, (fragment, text)


def test_demo_script_without_deploy_file_says_what_to_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--deploy", str(tmp_path / "none.st")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: deploy file not found") and "demo.sh" in lines[0]


def test_digitsnet_fuses_exactly_with_random_weights():
    model = randomized(DigitsNet(widths=(8, 16, 16), depths=(1, 2)), seed=3)
    deploy, report = assert_equivalent(model, (4, 1, 8, 8))
    assert report.blocks == {"RepVGGBlock": 4}
    assert deploy(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="one depth"):
        DigitsNet(widths=(8, 16), depths=(1, 1))


def test_spec_with_wrong_digitsnet_args_is_a_spec_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.read_text().replace("num_classes: 10", "classes: 10"))
    with pytest.raises(SpecError, match="rejected its arguments"):
        load_spec(str(bad)).build(device="meta")
