"""`reparam batch`: folders, failures, parallel jobs, resume, shards, manifests."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from reparam_cli.pipeline.batch import BatchError, Manifest, Shard, discover, output_names
from reparam_cli.io.checkpoint import sha256_file
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.pipeline.conversion import init_checkpoint
from reparam_cli.pipeline.training import load_training_model
from reparam_cli.pipeline.specs import load_spec

from .helpers import run_cli

TINY = """\
name: tiny-repvgg
builder: reparam_cli.blocks.repvgg:RepVGG
args: {num_blocks: [1, 1, 1, 1], width_multiplier: [0.25, 0.25, 0.25, 0.25], num_classes: 10}
input_shape: [1, 3, 32, 32]
"""


run = run_cli


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory, spec) -> Path:
    """A few distinct tiny checkpoints to copy from (init once per module)."""
    folder = tmp_path_factory.mktemp("pool")
    for seed in range(4):
        init_checkpoint(str(spec), folder / f"s{seed}.pth", seed=seed)
    init_checkpoint(str(spec), folder / "s9.safetensors", seed=9)
    return folder


def make_tree(root: Path, pool: Path, files: dict[str, str]) -> Path:
    """files: relative path -> pool file name (or 'corrupt')."""
    for rel, source in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if source == "corrupt":
            target.write_bytes(b"PK\x03\x04 this is not a zip archive")
        else:
            shutil.copy(pool / source, target)
    return root


def manifest(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {e["relpath"]: e for e in lines}


def test_corrupt_member_fails_alone(tmp_path, spec, pool):
    src = make_tree(tmp_path / "in", pool, {"a.pth": "s0.pth", "b.safetensors": "s9.safetensors",
                                            "broken.pth": "corrupt", "c.ckpt": "s1.pth"})
    out = tmp_path / "out"
    result = run("batch", src, "--spec", spec, "-o", out, "--json")
    assert result.exit_code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["converted"], summary["failed"], summary["skipped"]) == (3, 1, 0) and not summary["ok"]
    entries = manifest(out / "manifest.jsonl")
    assert set(entries) == {"a.pth", "b.safetensors", "broken.pth", "c.ckpt"}
    broken = entries["broken.pth"]
    assert broken["status"] == "failed" and "cannot read" in broken["error"] and broken["output_sha256"] is None
    assert not (out / "broken.deploy.safetensors").exists()
    for rel in ("a.pth", "b.safetensors", "c.ckpt"):
        e = entries[rel]
        for key in ("input", "output", "status", "error", "max_rel_err", "seconds", "input_sha256", "output_sha256"):
            assert key in e
        assert e["status"] == "converted" and e["error"] is None and e["max_rel_err"] < 1e-4
        assert e["input_sha256"] == sha256_file(src / rel) and e["output_sha256"] == sha256_file(e["output"])
    # The deploy file computes what the training checkpoint computes.
    train = load_training_model(src / "c.ckpt", load_spec(str(spec)))
    deploy = load_deploy(out / "c.deploy.safetensors")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = train.double()(x.double()), deploy(x).double()
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_recursive_mirrors_layout_and_ignores_deploy_files(tmp_path, spec, pool):
    src = make_tree(tmp_path / "in", pool, {"top.pth": "s0.pth", "x/y/deep.pt": "s1.pth",
                                            "x/mid.safetensors": "s9.safetensors", ".hidden/h.pth": "s2.pth",
                                            "x/notes.txt": "s3.pth"})
    # Outputs of an earlier run in the input folder: by name, and renamed (found by their metadata).
    assert run("convert", src / "top.pth", "--spec", spec, "--no-verify").exit_code == 0
    shutil.copy(src / "top.deploy.safetensors", src / "x" / "renamed.safetensors")
    flat, _ = discover(src)
    assert flat == ["top.pth"]
    out = src / "converted"  # an output folder inside the input folder is never searched
    result = run("batch", src, "--spec", spec, "-o", out, "--recursive", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ignored_deploy_files"] == 2 and summary["converted"] == 3
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")) == [
        "top.deploy.safetensors", "x/mid.deploy.safetensors", "x/y/deep.deploy.safetensors"]
    again = run("batch", src, "--spec", spec, "-o", out, "--recursive", "--resume", "--json")
    assert json.loads(again.stdout)["skipped"] == 3  # its own outputs did not become inputs
    # A custom pattern, matched against the relative path when it has a slash.
    assert discover(src, ["x/*.safetensors"], recursive=True, exclude=out)[0] == ["x/mid.safetensors"]


def test_same_stem_inputs_get_distinct_outputs():
    names = output_names(["m.pth", "m.pt", "sub/m.pth", "n.bin"], "safetensors")
    assert names == {"m.pth": "m.pth.deploy.safetensors", "m.pt": "m.pt.deploy.safetensors",
                     "sub/m.pth": "sub/m.deploy.safetensors", "n.bin": "n.deploy.safetensors"}


def test_two_jobs_give_the_same_result_as_one(tmp_path, spec, pool):
    src = make_tree(tmp_path / "in", pool, {"a.pth": "s0.pth", "b.pth": "s1.pth", "c.pth": "s2.pth",
                                            "bad.pth": "corrupt"})
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run("batch", src, "--spec", spec, "-o", one, "--jobs", "1")
    r2 = run("batch", src, "--spec", spec, "-o", two, "--jobs", "2", "--json")
    assert r1.exit_code == r2.exit_code == 1
    assert json.loads(r2.stdout)["jobs"] == 2
    m1, m2 = manifest(one / "manifest.jsonl"), manifest(two / "manifest.jsonl")
    assert {k: (e["status"], e["input_sha256"]) for k, e in m1.items()} == \
           {k: (e["status"], e["input_sha256"]) for k, e in m2.items()}
    for name in ("a", "b", "c"):
        a, b = load_file(one / f"{name}.deploy.safetensors"), load_file(two / f"{name}.deploy.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        with safe_open(str(one / f"{name}.deploy.safetensors"), "pt") as f1, \
                safe_open(str(two / f"{name}.deploy.safetensors"), "pt") as f2:
            assert f1.metadata() == f2.metadata()


def test_resume_skips_unchanged_and_reconverts_changed(tmp_path, spec, pool):
    src = make_tree(tmp_path / "in", pool, {"a.pth": "s0.pth", "b.pth": "s1.pth", "c.safetensors": "s9.safetensors"})
    out = tmp_path / "out"
    assert run("batch", src, "--spec", spec, "-o", out).exit_code == 0
    # Without --resume an existing output is not replaced, and the error says what to do.
    again = run("batch", src, "--spec", spec, "-o", out, "--json")
    assert again.exit_code == 1 and "--resume" in manifest(out / "manifest.jsonl")["a.pth"]["error"]
    assert run("batch", src, "--spec", spec, "-o", out, "--overwrite").exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    result = run("batch", src, "--spec", spec, "-o", out, "--resume", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["skipped"] == 3
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == before  # nothing rewritten
    assert all(e["status"] == "skipped" and e["output_sha256"] for e in manifest(out / "manifest.jsonl").values())
    # A changed input is reconverted (its stale output replaced), a deleted output is rebuilt.
    shutil.copy(pool / "s3.pth", src / "b.pth")
    (out / "c.deploy.safetensors").unlink()
    result = run("batch", src, "--spec", spec, "-o", out, "--resume", "--json")
    entries = manifest(out / "manifest.jsonl")
    assert result.exit_code == 0
    assert {k: e["status"] for k, e in entries.items()} == {"a.pth": "skipped", "b.pth": "converted",
                                                           "c.safetensors": "converted"}
    assert entries["b.pth"]["input_sha256"] == sha256_file(pool / "s3.pth")
    train = load_training_model(src / "b.pth", load_spec(str(spec)))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_deploy(out / "b.deploy.safetensors")(x), train(x), rtol=1e-4, atol=1e-5)
    # An output altered since it was recorded is not trusted.
    with open(out / "a.deploy.safetensors", "ab") as f:
        f.write(b"\0")
    result = run("batch", src, "--spec", spec, "-o", out, "--resume", "--json")
    assert manifest(out / "manifest.jsonl")["a.pth"]["status"] == "converted"


def test_resume_after_a_crash_uses_the_partial_manifest(tmp_path, spec, pool):
    src = make_tree(tmp_path / "in", pool, {"a.pth": "s0.pth", "b.pth": "s1.pth"})
    out = tmp_path / "out"
    assert run("batch", src, "--spec", spec, "-o", out, "--no-verify").exit_code == 0
    # A killed run leaves only its partial manifest (with a torn last line).
    text = (out / "manifest.jsonl").read_text()
    (out / ".manifest.jsonl.partial").write_text(text + '{"relpath": "b.p')
    (out / "manifest.jsonl").unlink()
    result = run("batch", src, "--spec", spec, "-o", out, "--resume", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["skipped"] == 2
    assert (out / "manifest.jsonl").is_file() and not (out / ".manifest.jsonl.partial").exists()


def test_manifest_is_locked_against_a_second_run(tmp_path):
    first = Manifest(tmp_path, "manifest.jsonl")
    with pytest.raises(BatchError, match="another reparam batch"):
        Manifest(tmp_path, "manifest.jsonl")
    Manifest(tmp_path, "manifest.shard-0-of-2.jsonl").close()  # another shard: no conflict
    first.close()
    Manifest(tmp_path, "manifest.jsonl").close()


def test_shards_partition_the_inputs(tmp_path, spec, pool):
    names = {f"d{i % 2}/m{i}.pth": f"s{i % 4}.pth" for i in range(8)}
    src = make_tree(tmp_path / "in", pool, names)
    out = tmp_path / "out"
    shards = []
    for k in range(3):
        result = run("batch", src, "--spec", spec, "-o", out, "-r", "--shard", f"{k}/3", "--no-verify", "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["found"] == 8
        shards.append(set(manifest(out / f"manifest.shard-{k}-of-3.jsonl")))
    assert set().union(*shards) == set(names)
    assert all(not (shards[i] & shards[j]) for i in range(3) for j in range(i + 1, 3))
    assert len(list(out.rglob("*.deploy.safetensors"))) == 8 and not (out / "manifest.jsonl").exists()


def test_shard_assignment_is_a_partition_and_stable():
    rng = random.Random(0)
    paths = [f"run{rng.randrange(100)}/epoch_{rng.randrange(10**6)}.pth" for _ in range(300)]
    for n in (1, 2, 3, 7):
        owners = [[k for k in range(n) if Shard(k, n).takes(p)] for p in paths]
        assert all(len(o) == 1 for o in owners)
        if n > 1:  # roughly balanced
            sizes = [sum(o == [k] for o in owners) for k in range(n)]
            assert min(sizes) > 0.5 * len(paths) / n
    assert Shard.parse("2/3") == Shard(2, 3) and Shard.parse(None) == Shard(0, 1)
    assert Shard(1, 3).manifest_name == "manifest.shard-1-of-3.jsonl" and Shard().manifest_name == "manifest.jsonl"


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_usage_errors_exit_2(tmp_path, spec, pool):
    src = make_tree(tmp_path / "in", pool, {"a.pth": "s0.pth", "sub/b.pth": "s1.pth"})
    out = tmp_path / "out"
    for bad in ("3/3", "1", "a/b", "-1/2"):
        one_line_error(run("batch", src, "--spec", spec, "-o", out, "--shard", bad), "bad --shard")
    one_line_error(run("batch", tmp_path / "nope", "--spec", spec, "-o", out), "input folder not found")
    one_line_error(run("batch", src, "--spec", spec, "-o", out, "-p", "*.onnx"), "no checkpoints matching")
    one_line_error(run("batch", src / "sub", "--spec", spec, "-o", src / "a.pth"), "is a file")
    one_line_error(run("batch", src, "--spec", spec, "-o", out, "-f", "zip"), "unknown format")
    one_line_error(run("batch", src, "--spec", "no-such-spec", "-o", out), "unknown spec")
    assert not out.exists()  # nothing was created by a batch that could not start
    assert run("batch", src, "--spec", spec).exit_code == 2  # --output-dir is required


def test_human_output_goes_to_stderr(tmp_path, spec, pool):
    src = make_tree(tmp_path / "in", pool, {"a.pth": "s0.pth", "bad.pth": "corrupt"})
    result = run("batch", src, "--spec", spec, "-o", tmp_path / "out", "--input-shape", "2,3,32,32")
    assert result.exit_code == 1 and result.stdout == ""
    assert "converted a.pth" in result.stderr and "failed    bad.pth: cannot read" in result.stderr
    assert "1 converted, 0 skipped, 1 failed" in result.stderr


def test_json_stdout_survives_a_printing_spec(tmp_path, pool):
    spec = tmp_path / "noisy.py"
    spec.write_text("from reparam_cli.blocks.repvgg import RepVGG\nprint('noise on import')\n"
                    "INPUT_SHAPE = (1, 3, 32, 32)\n\n\ndef build_model():\n    print('noise while building')\n"
                    "    return RepVGG(num_blocks=[1, 1, 1, 1], width_multiplier=[0.25] * 4, num_classes=10)\n")
    src = make_tree(tmp_path / "in", pool, {"a.pth": "s0.pth"})
    result = run("batch", src, "--spec", spec, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["converted"] == 1 and "noise while building" in result.stderr


def test_resume_reconverts_when_the_graph_setting_changes(tmp_path, spec, pool):
    src = make_tree(tmp_path / "in", pool, {"a.pth": "s0.pth"})
    out = tmp_path / "out"
    assert run("batch", src, "--spec", spec, "-o", out).exit_code == 0
    assert manifest(out / "manifest.jsonl")["a.pth"]["graph"] is True
    result = run("batch", src, "--spec", spec, "-o", out, "--resume", "--no-graph", "--json")
    entry = manifest(out / "manifest.jsonl")["a.pth"]
    assert result.exit_code == 0 and entry["status"] == "converted" and entry["graph"] is False
    result = run("batch", src, "--spec", spec, "-o", out, "--resume", "--no-graph", "--json")
    assert json.loads(result.stdout)["skipped"] == 1
