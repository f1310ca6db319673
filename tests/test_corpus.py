"""The bad-input corpus: every way a hostile or careless user can call reparam wrongly, through the
CLI (in-process) and the Python API. Each case must give its exit code and ONE line on stderr (no
traceback), leave no file behind (hidden temporaries included), leave its inputs byte-identical,
and run no code from a file (the marker file that crafted inputs would create never appears)."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch

from reparam_cli.pipeline.conversion import convert_checkpoint, init_checkpoint

from .helpers import TINY_REPVGG_YAML, restamp, run_cli

TINY = TINY_REPVGG_YAML


class Payload:
    """A pickle that would run `touch MARKER` when unpickled with full unpickling."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)



@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Every bad input once, in a folder the cases must leave exactly as they found it."""
    d = tmp_path_factory.mktemp("corpus-inputs")
    marker = d.parent / f"{d.name}-MARKER"  # outside the folder: its absence is what is checked
    (d / "tiny.yaml").write_text(TINY)
    init_checkpoint(str(d / "tiny.yaml"), d / "t.pth", seed=0)
    convert_checkpoint(d / "t.pth", str(d / "tiny.yaml"), d / "t.deploy.safetensors", verify_output=False)
    state = torch.load(d / "t.pth", weights_only=True)
    good = (d / "t.pth").read_bytes()
    (d / "empty.pth").write_bytes(b"")
    (d / "garbage.pth").write_bytes(b"\x00junk" * 100)
    (d / "truncated.pth").write_bytes(good[: len(good) // 2])
    sf = (d / "t.deploy.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(sf[: len(sf) - 100])
    (d / "badheader.safetensors").write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    (d / "hugeheader.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    (d / "text.pth").write_text("this is not a checkpoint\n")
    (d / "folder.pth").mkdir()
    torch.save({**state, next(k for k in state if k.endswith("conv.weight")):
                state[next(k for k in state if k.endswith("conv.weight"))].to(torch.int32)}, d / "int.pth")
    torch.save({k: v for k, v in list(state.items())[:-3]}, d / "missing_keys.pth")
    torch.save({**state, "stage9.extra": torch.zeros(3)}, d / "extra_keys.pth")
    (d / "pickle_code.pth").write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    torch.save({"weights": Payload(marker)}, d / "torch_pickle_code.pth")
    restamp(d / "t.deploy.safetensors", d / "os_system.deploy.safetensors", builder="os:system",
             args={"command": f"touch {marker}"})
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n\ndef build_model():\n    open({str(marker)!r}, 'w')\n")
    restamp(d / "t.deploy.safetensors", d / "pyfile.deploy.safetensors", builder=f"{d / 'evil.py'}:build_model")
    (d / "foreign.pt2").write_bytes(good)
    (d / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 10)
    (d / "garbage.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    (d / "bad.yaml").write_text("builder: [unclosed\n")
    (d / "unknown_keys.yaml").write_text(TINY + "wat: 1\n")
    (d / "no_module.yaml").write_text("builder: no_such_module_xyz:build\n")
    (d / "not_module.yaml").write_text("builder: reparam_cli.blocks.repvgg:RepVGG\nargs: {nonsense: 1}\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (d / "argparses.py").write_text("import argparse\nargparse.ArgumentParser().parse_args(['--nope'])\n")
    (d / "raises.py").write_text("raise RuntimeError('spec broke\\nsecond line')\n")
    (d / "nobuild.py").write_text("X = 1\n")
    (d / "returns_int.py").write_text("def build_model():\n    return 3\n")
    (d / "build_exits.py").write_text("def build_model():\n    raise SystemExit('no')\n")
    (d / "empty_dir").mkdir()
    (d / "exists.safetensors").write_bytes(b"precious")
    return {"dir": d, "marker": marker}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` (hidden ones included) -> sha256 of its bytes ('dir' for folders)."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


# (id, argv with {in}/{out} placeholders, expected exit code, text the one stderr line must contain)
# {in}: the inputs folder, {out}: an empty output folder the case must leave empty.
CLI_CASES = [
    # convert: unreadable or unfit checkpoints
    ("convert-missing", "convert {in}/nope.pth -s {in}/tiny.yaml -o {out}/o.safetensors", 2, "not found"),
    ("convert-empty", "convert {in}/empty.pth -s {in}/tiny.yaml -o {out}/o.safetensors", 2, "{in}/empty.pth"),
    ("convert-garbage", "convert {in}/garbage.pth -s {in}/tiny.yaml -o {out}/o.safetensors", 2, "garbage.pth"),
    ("convert-truncated", "convert {in}/truncated.pth -s {in}/tiny.yaml -o {out}/o.safetensors", 2, "truncated.pth"),
    ("convert-truncated-st", "convert {in}/truncated.safetensors -s {in}/tiny.yaml -o {out}/o.safetensors", 2,
     "truncated.safetensors"),
    ("convert-bad-header", "convert {in}/badheader.safetensors -s {in}/tiny.yaml -o {out}/o.safetensors", 2,
     "badheader.safetensors"),
    ("convert-huge-header", "convert {in}/hugeheader.safetensors -s {in}/tiny.yaml -o {out}/o.safetensors", 2,
     "hugeheader.safetensors"),
    ("convert-text", "convert {in}/text.pth -s {in}/tiny.yaml -o {out}/o.safetensors", 2, "text.pth"),
    ("convert-dir", "convert {in}/folder.pth -s {in}/tiny.yaml -o {out}/o.safetensors", 2, "folder.pth"),
    ("convert-int-weights", "convert {in}/int.pth -s {in}/tiny.yaml -o {out}/o.safetensors", 2,
     "conv.weight (checkpoint int32, model float32)"),
    ("convert-missing-keys", "convert {in}/missing_keys.pth -s {in}/tiny.yaml -o {out}/o.safetensors", 2,
     "missing keys"),
    ("convert-extra-keys", "convert {in}/extra_keys.pth -s {in}/tiny.yaml -o {out}/o.safetensors", 2,
     "unexpected keys: stage9.extra"),
    ("convert-wrong-spec", "convert {in}/t.pth -s repvgg-a0 -o {out}/o.safetensors", 2, "does not fit"),
    ("convert-pickle-code", "convert {in}/pickle_code.pth -s {in}/tiny.yaml -o {out}/o.safetensors", 2,
     "pickle_code.pth"),
    ("convert-torch-pickle-code", "convert {in}/torch_pickle_code.pth -s {in}/tiny.yaml -o {out}/o.safetensors", 2,
     "--trust-pickle"),
    ("convert-deploy-file", "convert {in}/t.deploy.safetensors -s {in}/tiny.yaml -o {out}/o.safetensors", 2,
     "already"),
    ("convert-crafted-deploy", "convert {in}/os_system.deploy.safetensors -s {in}/tiny.yaml -o {out}/o.safetensors",
     2, "already"),
    # convert: bad specs
    ("convert-unknown-spec", "convert {in}/t.pth -s no-such-spec -o {out}/o.safetensors", 2, "unknown spec"),
    ("convert-spec-missing-file", "convert {in}/t.pth -s {in}/nope.yaml -o {out}/o.safetensors", 2, "not found"),
    ("convert-spec-bad-yaml", "convert {in}/t.pth -s {in}/bad.yaml -o {out}/o.safetensors", 2, "bad.yaml"),
    ("convert-spec-unknown-keys", "convert {in}/t.pth -s {in}/unknown_keys.yaml -o {out}/o.safetensors", 2,
     "unknown keys: wat"),
    ("convert-spec-no-module", "convert {in}/t.pth -s {in}/no_module.yaml -o {out}/o.safetensors", 2,
     "cannot import no_such_module_xyz"),
    ("convert-spec-bad-args", "convert {in}/t.pth -s {in}/not_module.yaml -o {out}/o.safetensors", 2,
     "rejected its arguments"),
    ("convert-spec-list", "convert {in}/t.pth -s {in}/list.yaml -o {out}/o.safetensors", 2, "mapping"),
    ("convert-spec-exits", "convert {in}/t.pth -s {in}/exits.py -o {out}/o.safetensors", 2, "sys.exit(3)"),
    ("convert-spec-argparse", "convert {in}/t.pth -s {in}/argparses.py -o {out}/o.safetensors", 2, "sys.exit(2)"),
    ("convert-spec-raises", "convert {in}/t.pth -s {in}/raises.py -o {out}/o.safetensors", 2, "spec broke"),
    ("convert-spec-no-build", "convert {in}/t.pth -s {in}/nobuild.py -o {out}/o.safetensors", 2, "build_model"),
    ("convert-spec-returns-int", "convert {in}/t.pth -s {in}/returns_int.py -o {out}/o.safetensors", 2,
     "not an nn.Module"),
    ("convert-spec-build-exits", "convert {in}/t.pth -s {in}/build_exits.py -o {out}/o.safetensors", 2,
     "sys.exit('no')"),
    ("convert-timm-pretrained", "convert {in}/t.pth -s timm:repvgg_a0?pretrained=true -o {out}/o.safetensors", 2,
     "pretrained"),
    # convert: bad options and outputs
    ("convert-format", "convert {in}/t.pth -s {in}/tiny.yaml -o {out}/o.safetensors -f zip", 2, "unknown format"),
    ("convert-dtype", "convert {in}/t.pth -s {in}/tiny.yaml -o {out}/o.safetensors --dtype int8", 2,
     "unknown dtype"),
    ("convert-shape-zero", "convert {in}/t.pth -s {in}/tiny.yaml -o {out}/o.safetensors --input-shape 0,3", 2,
     "input_shape"),
    ("convert-shape-text", "convert {in}/t.pth -s {in}/tiny.yaml -o {out}/o.safetensors --input-shape abc", 2,
     "input_shape"),
    ("convert-shape-unfit", "convert {in}/t.pth -s {in}/tiny.yaml -o {out}/o.safetensors --input-shape 1,5,32,32",
     2, "--input-shape"),
    ("convert-samples-zero", "convert {in}/t.pth -s {in}/tiny.yaml --samples 0", 2, "--samples"),
    ("convert-rtol-negative", "convert {in}/t.pth -s {in}/tiny.yaml --rtol -1", 2, "--rtol"),
    ("convert-unknown-option", "convert {in}/t.pth -s {in}/tiny.yaml --frobnicate", 2, "--frobnicate"),
    ("convert-no-spec", "convert {in}/t.pth", 2, "--spec"),
    ("convert-no-args", "convert", 2, "CHECKPOINT"),
    ("convert-output-exists", "convert {in}/t.pth -s {in}/tiny.yaml -o {in}/exists.safetensors", 2,
     "already exists"),
    ("convert-output-is-dir", "convert {in}/t.pth -s {in}/tiny.yaml -o {in}/empty_dir --overwrite", 2,
     "directory"),
    ("convert-output-is-input", "convert {in}/t.pth -s {in}/tiny.yaml -o {in}/t.pth --overwrite", 2, "over its input"),
    ("convert-json-to-stdout", "convert {in}/t.pth -s {in}/tiny.yaml -o - --json", 2, "--json"),
    ("convert-stdin-no-output", "convert - -s {in}/tiny.yaml", 2, "-o"),
    ("convert-stdin-garbage", "convert - -s {in}/tiny.yaml -o {out}/o.safetensors < {in}/garbage.pth", 2, "neither"),
    ("convert-stdin-empty", "convert - -s {in}/tiny.yaml -o {out}/o.safetensors < {in}/empty.pth", 2, "empty"),
    ("convert-stdin-pickle", "convert - -s {in}/tiny.yaml -o {out}/o.safetensors < {in}/torch_pickle_code.pth", 2,
     "<stdin>"),
    # verify
    ("verify-missing-deploy", "verify {in}/t.pth {in}/nope.safetensors -s {in}/tiny.yaml", 2, "not found"),
    ("verify-missing-ckpt", "verify {in}/nope.pth {in}/t.deploy.safetensors -s {in}/tiny.yaml", 2, "not found"),
    ("verify-garbage-deploy", "verify {in}/t.pth {in}/truncated.safetensors -s {in}/tiny.yaml", 2,
     "truncated.safetensors"),
    ("verify-foreign-pt2", "verify {in}/t.pth {in}/foreign.pt2 -s {in}/tiny.yaml", 2, "foreign.pt2"),
    ("verify-garbage-onnx", "verify {in}/t.pth {in}/garbage.onnx -s {in}/tiny.yaml", 2, "garbage.onnx"),
    ("verify-garbage-torchscript", "verify {in}/t.pth {in}/garbage.pt -s {in}/tiny.yaml", 2, "garbage.pt"),
    ("verify-wrong-spec", "verify {in}/t.pth {in}/t.deploy.safetensors -s repvgg-a0", 2, "does not fit"),
    ("verify-pickle-code", "verify {in}/torch_pickle_code.pth {in}/t.deploy.safetensors -s {in}/tiny.yaml", 2,
     "--trust-pickle"),
    ("verify-spec-exits", "verify {in}/t.pth {in}/t.deploy.safetensors -s {in}/exits.py", 2, "sys.exit(3)"),
    # inspect
    ("inspect-missing", "inspect {in}/nope.pth", 2, "not found"),
    ("inspect-garbage", "inspect {in}/garbage.pth", 2, "garbage.pth"),
    ("inspect-dir", "inspect {in}/folder.pth", 2, "folder.pth"),
    ("inspect-bad-header", "inspect {in}/badheader.safetensors", 2, "badheader.safetensors"),
    ("inspect-huge-header", "inspect {in}/hugeheader.safetensors", 2, "hugeheader.safetensors"),
    ("inspect-pickle-code", "inspect {in}/torch_pickle_code.pth", 2, "--trust-pickle"),
    ("inspect-crafted-os-system", "inspect {in}/os_system.deploy.safetensors", 2, "--trust-spec"),
    ("inspect-crafted-pyfile", "inspect {in}/pyfile.deploy.safetensors --json", 2, "--trust-spec"),
    ("inspect-crafted-stdin", "inspect - < {in}/pyfile.deploy.safetensors", 2, "--trust-spec"),
    ("inspect-stdin-empty", "inspect - < {in}/empty.pth", 2, "empty"),
    ("inspect-wrong-spec", "inspect {in}/t.pth -s repvgg-a0", 2, "does not fit"),
    ("inspect-spec-raises", "inspect {in}/t.pth -s {in}/raises.py --json", 2, "spec broke"),
    # batch
    ("batch-missing-dir", "batch {in}/nope -s {in}/tiny.yaml -o {out}/b", 2, "nope"),
    ("batch-file-as-dir", "batch {in}/t.pth -s {in}/tiny.yaml -o {out}/b", 2, "t.pth"),
    ("batch-empty-dir", "batch {in}/empty_dir -s {in}/tiny.yaml -o {out}/b", 2, "no"),
    ("batch-unknown-spec", "batch {in} -s no-such-spec -o {out}/b", 2, "unknown spec"),
    ("batch-spec-exits", "batch {in} -s {in}/exits.py -o {out}/b", 2, "sys.exit(3)"),
    ("batch-shard-range", "batch {in} -s {in}/tiny.yaml -o {out}/b --shard 3/2", 2, "shard"),
    ("batch-shard-text", "batch {in} -s {in}/tiny.yaml -o {out}/b --shard abc", 2, "shard"),
    ("batch-format", "batch {in} -s {in}/tiny.yaml -o {out}/b -f zip", 2, "format"),
    ("batch-no-output", "batch {in} -s {in}/tiny.yaml", 2, "--output-dir"),
    ("batch-crafted-only", "batch {in} -s {in}/tiny.yaml -o {out}/b -p *.deploy.safetensors", 2, "no"),
    # init
    ("init-unknown-spec", "init no-such-spec -o {out}/i.pth", 2, "unknown spec"),
    ("init-output-exists", "init {in}/tiny.yaml -o {in}/exists.safetensors", 2, "already exists"),
    ("init-spec-exits", "init {in}/exits.py -o {out}/i.pth", 2, "sys.exit(3)"),
    ("init-spec-argparse", "init {in}/argparses.py -o {out}/i.pth --json", 2, "sys.exit(2)"),
    ("init-no-output", "init {in}/tiny.yaml", 2, "--output"),
    # no such command
    ("unknown-command", "frobnicate", 2, "No such command"),
]


@pytest.mark.parametrize("argv,code,expect", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(inputs, tmp_path, argv, code, expect):
    folder, out = inputs["dir"], tmp_path / "out"
    out.mkdir()
    before = _snapshot(folder)
    argv = argv.format(**{"in": folder, "out": out})
    stdin = None
    if " < " in argv:
        argv, source = argv.split(" < ")
        stdin = Path(source).read_bytes()
    result = run_cli(*argv.split(), stdin=stdin)
    assert result.exit_code == code, result.output
    err = result.stderr
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expect.format(**{"in": folder}) in err and "Traceback" not in err
    assert not re.search(r"unexpected \w+(Error|Exception)", err), err  # every user error is named
    if "--json" in argv and "-o -" not in argv:
        assert json.loads(result.stdout, parse_constant=float)["ok"] is False
    assert _snapshot(out) == {} and _snapshot(folder) == before  # nothing written, inputs unchanged
    assert not inputs["marker"].exists()


def _api_cases(d: Path):
    from reparam_cli.core import algebra  # noqa: F401
    from reparam_cli.pipeline.deploy import load_deploy
    from reparam_cli.convert.engine import reparameterize
    from reparam_cli.pipeline.inspection import inspect_checkpoint
    from reparam_cli.pipeline.conversion import verify_checkpoint
    from reparam_cli.pipeline.specs import load_spec

    spec = str(d / "tiny.yaml")
    return {
        "load_deploy-os-system": lambda: load_deploy(d / "os_system.deploy.safetensors"),
        "load_deploy-pyfile": lambda: load_deploy(d / "pyfile.deploy.safetensors"),
        "load_deploy-truncated": lambda: load_deploy(d / "truncated.safetensors", spec),
        "load_deploy-no-metadata": lambda: load_deploy(d / "badheader.safetensors"),
        "convert-missing": lambda: convert_checkpoint(d / "nope.pth", spec, d / "o.safetensors"),
        "convert-int": lambda: convert_checkpoint(d / "int.pth", spec, d / "o.safetensors"),
        "convert-pickle-code": lambda: convert_checkpoint(d / "torch_pickle_code.pth", spec, d / "o.safetensors"),
        "verify-foreign-pt2": lambda: verify_checkpoint(d / "t.pth", d / "foreign.pt2", spec),
        "inspect-crafted": lambda: inspect_checkpoint(d / "pyfile.deploy.safetensors"),
        "load_spec-exits": lambda: load_spec(str(d / "exits.py")),
        "load_spec-unknown": lambda: load_spec("no-such-spec"),
        "reparameterize-not-a-module": lambda: reparameterize("model"),
    }


API_CASES = ["load_deploy-os-system", "load_deploy-pyfile", "load_deploy-truncated", "load_deploy-no-metadata",
             "convert-missing", "convert-int", "convert-pickle-code", "verify-foreign-pt2", "inspect-crafted",
             "load_spec-exits", "load_spec-unknown", "reparameterize-not-a-module"]


@pytest.mark.parametrize("case", API_CASES)
def test_python_api_bad_input(inputs, case):
    """The Python API raises a ReparamError with a one-line message, writes nothing, runs nothing."""
    from reparam_cli.errors import ReparamError

    folder = inputs["dir"]
    before = _snapshot(folder)
    with pytest.raises(ReparamError) as info:
        _api_cases(folder)[case]()
    assert "\n" not in str(info.value)
    assert _snapshot(folder) == before and not inputs["marker"].exists()
