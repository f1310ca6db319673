"""Issue 18: int8 readiness (`reparam quantize`), exact cross-layer equalization, int8 ONNX.

Tolerances: algebra-level equalization is checked in float64 at 1e-9 relative to the output's
magnitude (the float64 floor is ~1e-15; a wrong scale is off by O(1)); a float32 model equalized
in place is checked at 1e-5 relative (its float32 forward's rounding floor is ~1e-7 per layer).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from reparam_cli.core import algebra as A

settings.register_profile("reparam", max_examples=40, deadline=None)
settings.load_profile("reparam")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


ACTS = {"relu": F.relu, "leaky": lambda x: F.leaky_relu(x, 0.1), "identity": lambda x: x,
        "maxpool": lambda x: F.max_pool2d(x, 2, 1, 1) if x.dim() == 4 else x}


@given(seed=st.integers(0, 2**31 - 1), g1=st.sampled_from([1, 2, 4]), g2=st.sampled_from([1, 2, 4, 8]),
       k1=st.sampled_from([1, 3]), k2=st.sampled_from([1, 3, 5]), act=st.sampled_from(sorted(ACTS)),
       bias=st.booleans(), fc=st.booleans())
def test_equalize_pair_is_exact_and_evens_ranges(seed, g1, g2, k1, k2, act, bias, fc):
    """Random conv -> activation -> conv (or -> FC): same output after equalization, in float64,
    and both layers' per-channel ranges equal sqrt(r1 * r2) where neither is zero."""
    g = torch.Generator().manual_seed(seed)
    c_in, mid, out = 8, 8, 16
    w1 = torch.randn(mid, c_in // g1, k1, k1, generator=g, dtype=torch.float64)
    w1 = w1 * torch.logspace(-2, 2, mid, dtype=torch.float64).reshape(-1, 1, 1, 1)  # fused-like uneven channels
    first = A.Kernel(w1, torch.randn(mid, generator=g, dtype=torch.float64) if bias else None,
                     padding=(k1 // 2,) * 2, groups=g1)
    if fc:
        second = A.Kernel(torch.randn(out, mid, generator=g, dtype=torch.float64))
    else:
        second = A.Kernel(torch.randn(out, mid // g2, k2, k2, generator=g, dtype=torch.float64), None,
                          padding=(k2 // 2,) * 2, groups=g2)
    x = torch.randn(2, c_in, 6, 6, generator=g, dtype=torch.float64)
    f = ACTS[act]

    def net(a, b):
        h = f(A.apply(a, x))
        if fc:
            h = h.mean((2, 3))
        return A.apply(b, h)

    n1, n2, s = A.equalize_pair(first, second)
    assert (s > 0).all()
    assert _rel(net(n1, n2), net(first, second)) < 1e-9
    r1 = n1.weight.abs().reshape(mid, -1).amax(1)
    per_group = mid // second.groups
    w2 = n2.weight.reshape(second.groups, out // second.groups, per_group, -1)
    r2 = w2.abs().transpose(1, 2).reshape(second.groups, per_group, -1).amax(2).reshape(mid)
    assert torch.allclose(r1, r2, rtol=1e-9)


def test_equalize_pair_refuses_mismatch_and_negative_scales():
    from reparam_cli.errors import NotEquivalent

    a = A.Kernel(torch.randn(4, 3, 3, 3))
    with pytest.raises(NotEquivalent):
        A.equalize_pair(a, A.Kernel(torch.randn(5, 5, 1, 1)))
    with pytest.raises(NotEquivalent):
        A.equalize_pair(a, A.Kernel(torch.randn(5, 4, 1, 1)), scale=-torch.ones(4))


# --------------------------------------------------------------------------- the model pass

from pathlib import Path  # noqa: E402

from tests.helpers import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "digits-repvgg.safetensors"
DEMO_SPEC = ROOT / "examples" / "digits-repvgg.yaml"
DEMO_DATA = ROOT / "examples" / "digits-test.npz"


class Chain(nn.Module):
    """conv -> ReLU -> grouped conv -> LeakyReLU -> conv -> PReLU -> maxpool -> conv -> SiLU -> conv,
    a fan-out (c5 read twice), a residual add after c6 and a pooled FC head: what equalization
    must pair or skip."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.act3 = nn.PReLU(16)
        self.c4 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.c5 = nn.Conv2d(16, 16, 1)
        self.c6 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.leaky_relu(self.c2(torch.relu(self.c1(x))), 0.2)
        x = F.max_pool2d(self.act3(self.c3(x)), 2)
        x = F.silu(self.c4(x))
        y = self.c5(x)
        x = self.c6(torch.relu(y)) + y  # c5 fans out: not equalizable
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(x), 1), 1))


def _uneven(model: nn.Module, seed: int = 0) -> nn.Module:
    """Per-channel scales over four decades, as BN folding produces."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.logspace(-2, 2, m.weight.shape[0])[torch.randperm(m.weight.shape[0], generator=g)]
                              .reshape(-1, *([1] * (m.weight.dim() - 1))))
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return model.eval()


def test_equalize_model_is_exact_at_the_float32_floor_and_says_what_it_skipped():
    from reparam_cli.quantize.analysis import analyse, weight_stats
    from reparam_cli.quantize.equalize import equalize

    torch.manual_seed(0)
    model = _uneven(Chain())
    x = torch.randn(4, 3, 8, 8)
    eq = copy.deepcopy(model)
    report = equalize(eq, (x,))
    pairs = {(p.first, p.second) for p in report.pairs}
    assert pairs == {("c1", "c2"), ("c2", "c3"), ("c3", "c4")}
    reasons = {s["layer"]: s["reason"] for s in report.skipped}
    assert "silu" in reasons["c4"] and "several" in reasons["c5"] and "add" in reasons["c6"]
    with torch.no_grad():
        ref, out = model.double()(x.double()), eq.float()(x).double()
        model.float()
    assert _rel(out, ref) < 1e-5  # float32 floor; a wrong scale is O(1)
    for name in ("c1", "c2", "c3"):  # the uneven channel ranges are evened out
        before, after = weight_stats(getattr(model, name).weight), weight_stats(getattr(eq, name).weight)
        assert after["range_ratio"] < before["range_ratio"]
    batches = [(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    plain = analyse(model, batches[:2], batches[2:], granularity="per-tensor").cumulative_sqnr
    assert analyse(eq, batches[:2], batches[2:], granularity="per-tensor").cumulative_sqnr > plain + 1


def test_fake_quant_figures():
    from reparam_cli.quantize.analysis import EXACT_DB, fake_quant_weight, sqnr_db, weight_stats

    w = torch.randn(8, 4, 3, 3)
    w[3] *= 50
    stats = weight_stats(w)
    assert stats["outlier_channels"] == [3] and stats["range_ratio"] > 20
    assert stats["sqnr_per_channel"] > stats["sqnr_per_tensor"] + 5
    q = fake_quant_weight(w)
    scale = w.abs().reshape(8, -1).amax(1) / 127
    assert torch.allclose(q / scale.reshape(-1, 1, 1, 1), (w / scale.reshape(-1, 1, 1, 1)).round(), atol=1e-4)
    assert sqnr_db(w, w) == EXACT_DB
    assert abs(sqnr_db(torch.ones(100, dtype=torch.float64), torch.full((100,), 1.1, dtype=torch.float64)) - 20.0) < 1e-9


# --------------------------------------------------------------------------- the command

def _json(result):
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def test_quantize_demo_writes_an_int8_onnx_whose_figures_recompute(tmp_path):
    """The int8 ONNX file runs in onnxruntime, its QDQ nodes are there, keep-in-float layers stay
    float, and the reported SQNR / top-1 agreement equal a recomputation here."""
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    import onnx

    from reparam_cli.quantize.analysis import sqnr_db
    from reparam_cli.pipeline.quantization import load_fused

    out, keep = tmp_path / "digits.int8.onnx", tmp_path / "keep.json"
    n = 120
    result = run_cli("quantize", DEMO, "--spec", DEMO_SPEC, "--calib", DEMO_DATA, "--calib-samples", n,
                     "-o", out, "--keep-in-float", keep, "--target-sqnr", 40, "--no-equalize", "--json")
    assert result.exit_code == 0, result.stderr
    report = _json(result)
    assert report["ok"] and report["classifier"] and report["calibration"]["held_out"] == n // 4
    assert report["keep_in_float"] and report["sqnr_with_keep_in_float"] >= report["cumulative_sqnr"]
    assert report["accuracy"]["float"] > 0.95
    listed = json.loads(keep.read_text())
    assert [k["path"] for k in listed["keep_in_float"]] == report["keep_in_float"]
    assert all(k["onnx_node"] for k in listed["keep_in_float"])
    assert sorted(report["onnx_excluded_nodes"]) == sorted(k["onnx_node"] for k in listed["keep_in_float"])

    graph = onnx.load(str(out)).graph
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) > 0
    dequantized = {node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    for k in listed["keep_in_float"]:  # a kept layer's weight stays a float initializer
        assert f"{k['path']}.weight_quantized" not in dequantized
        assert any(i.name == f"{k['path']}.weight" for i in graph.initializer)

    with np.load(DEMO_DATA) as data:
        held = torch.from_numpy(data["images"][:n][n - n // 4:])
    model, _, _ = load_fused(DEMO, str(DEMO_SPEC))
    with torch.no_grad():
        ref = model.double()(held.double())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: held.numpy()})[0]).double()
    agreement = float((got.argmax(1) == ref.argmax(1)).double().mean())
    assert report["onnx_top1_agreement"] == pytest.approx(agreement, abs=1e-12)
    assert report["onnx_sqnr"] == pytest.approx(sqnr_db(ref, got), abs=0.01)
    assert report["onnx_qdq_sqnr"] > 25  # the QDQ graph's own figure (this CPU's kernels may saturate)


def test_quantize_min_sqnr_fails_with_nothing_written(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "no.onnx"
    result = run_cli("quantize", DEMO, "--spec", DEMO_SPEC, "--calib", DEMO_DATA, "--calib-samples", 40,
                     "--no-equalize", "-o", out, "--min-sqnr", 120, "--json")
    assert result.exit_code == 1
    report = _json(result)
    assert report["ok"] is False and report["onnx_sqnr"] < 120
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_text("not an array"), "not a numpy array file"),
    (lambda p: __import__("numpy").save(p, __import__("numpy").zeros((6, 3, 8, 8), "float32")), "have shape (6, 3, 8, 8)"),
    (lambda p: __import__("numpy").save(p, __import__("numpy").zeros((1, 1, 8, 8), "float32")), "at least 2"),
    (lambda p: __import__("numpy").save(p, __import__("numpy").full((4, 1, 8, 8), float("nan"), "float32")), "NaN"),
    (lambda p: p.mkdir(), "no images"),
    (lambda p: None, "not found"),
], ids=["garbage", "channels", "one-sample", "nan", "empty-folder", "missing"])
def test_bad_calibration_input_is_one_line_exit_2(tmp_path, make, needle):
    path = tmp_path / "calib.npy"
    make(path)
    result = run_cli("quantize", DEMO, "--spec", DEMO_SPEC, "--calib", path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_calibration_from_images_and_from_a_spec_hook(tmp_path):
    from PIL import Image

    from reparam_cli.quantize.calibration import load_calibration
    from reparam_cli.pipeline.specs import load_spec

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray((torch.rand(12, 10) * 255).byte().numpy(), "L").save(folder / f"{i}.png")
    cal = load_calibration(folder, (1, 1, 8, 8), 4)
    assert cal.inputs.shape == (4, 1, 8, 8) and 0 <= float(cal.inputs.min()) and float(cal.inputs.max()) <= 1
    cal = load_calibration(folder, (1, 1, 8, 8), 4, mean=(0.5,), std=(0.25,))
    assert float(cal.inputs.min()) < 0
    rgb = load_calibration(folder, (1, 3, 16, 16), 4)  # grey files, RGB model: converted, ImageNet-normalised
    assert rgb.inputs.shape == (4, 3, 16, 16) and "ImageNet" in rgb.note

    spec_file = tmp_path / "digits_spec.py"
    spec_file.write_text(
        "import torch\n"
        "from reparam_cli.models.digits import DigitsNet\n"
        "INPUT_SHAPE = (1, 1, 8, 8)\n"
        "def build_model():\n    return DigitsNet()\n"
        "def calibration_inputs(n, shape):\n"
        "    return torch.rand(n, *shape[1:], generator=torch.Generator().manual_seed(1)), torch.zeros(n, dtype=torch.long)\n")
    cal = load_calibration(None, (1, 1, 8, 8), 12, spec=load_spec(str(spec_file)))
    assert cal.source == "calibration_inputs()" and cal.inputs.shape == (12, 1, 8, 8) and cal.labels is not None
    result = run_cli("quantize", DEMO, "--spec", spec_file, "--calib-samples", 12, "--json")
    assert result.exit_code == 0, result.stderr
    assert _json(result)["calibration"]["source"] == "calibration_inputs()"


def test_convert_equalize_is_verified_and_helps_per_tensor_int8(tmp_path):
    out = tmp_path / "eq.safetensors"
    result = run_cli("convert", DEMO, "--spec", DEMO_SPEC, "-o", out, "--equalize", "--json")
    assert result.exit_code == 0, result.stderr
    report = _json(result)
    assert report["ok"] and report["max_rel_err"] < 1e-5 and len(report["equalization"]["pairs"]) == 5
    figures = {}
    for name, args in (("plain", (DEMO, "--spec", DEMO_SPEC)), ("equalized", (out,))):
        result = run_cli("quantize", *args, "--calib", DEMO_DATA, "--calib-samples", 80, "--no-equalize",
                         "--per-tensor", "--json")
        assert result.exit_code == 0, result.stderr
        figures[name] = _json(result)
    ratio = {k: max(r["range_ratio"] for r in v["layers"]) for k, v in figures.items()}
    assert ratio["equalized"] < ratio["plain"]
    assert figures["equalized"]["cumulative_sqnr"] > figures["plain"]["cumulative_sqnr"]


def test_quantize_equalization_never_lowers_the_simulated_sqnr():
    result = run_cli("quantize", DEMO, "--spec", DEMO_SPEC, "--calib", DEMO_DATA, "--calib-samples", 80, "--json")
    assert result.exit_code == 0, result.stderr
    report = _json(result)
    eq = report["equalization"]
    assert eq["exact"]["ok"] and eq["exact"]["max_rel_err"] < 1e-5
    assert report["cumulative_sqnr"] >= report["cumulative_sqnr_unequalized"]
    assert eq["applied"] == (eq["sqnr_after"] >= eq["sqnr_before"])
    if not eq["applied"]:
        assert eq["reason"].startswith("skipped")


def test_quantize_a_builtin_spec_checkpoint(tmp_path):
    """`reparam init` + `reparam quantize` on a small RepVGG spec (5 blocks + the classifier), random calibration."""
    from tests.helpers import TINY_REPVGG_YAML

    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_REPVGG_YAML)
    ckpt = tmp_path / "tiny.pth"
    assert run_cli("init", spec, "-o", ckpt).exit_code == 0
    result = run_cli("quantize", ckpt, "--spec", spec, "--calib-samples", 8, "--per-tensor", "--json")
    assert result.exit_code == 0, result.stderr
    report = _json(result)
    assert report["calibration"]["source"] == "random" and "indicative" in report["calibration"]["note"]
    assert report["equalization"]["pairs"] and report["equalization"]["exact"]["ok"]
    assert report["cumulative_sqnr"] >= report["cumulative_sqnr_unequalized"]
    assert len(report["layers"]) == 6 and all("sensitivity_sqnr" in r for r in report["layers"])
