"""`reparam batch` output names: the whole input -> output mapping is injective, also case-insensitively,
for any set of file names (property-based), and the collision case of the issue writes distinct,
correct outputs."""

from __future__ import annotations

import json
import random
from pathlib import PurePosixPath

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from reparam_cli.pipeline.batch import output_names
from reparam_cli.io.formats import SUFFIX
from reparam_cli.io.metadata import META_PREFIX
from reparam_cli.pipeline.conversion import init_checkpoint

from .helpers import run_cli

TINY = """\
name: tiny-repvgg
builder: reparam_cli.blocks.repvgg:RepVGG
args: {num_blocks: [1, 1, 1, 1], width_multiplier: [0.25, 0.25, 0.25, 0.25], num_classes: 10}
input_shape: [1, 3, 32, 32]
"""

# Names built from few letters, both cases and dots, so that stems, suffixes and case variants clash often.
_part = st.text(alphabet="aAbB.x", min_size=1, max_size=6).filter(lambda s: s not in (".", "..")
                                                                   and not s.startswith("."))
_name = st.tuples(_part, st.sampled_from([".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pth.bin", ""])).map(
    "".join)
_relpath = st.tuples(st.lists(st.sampled_from(["A", "a", "run", "Run", "x.pth", "x"]), max_size=2), _name).map(
    lambda t: "/".join([*t[0], t[1]]))


def _folders(rels):
    return {str(p).casefold() for r in rels for p in PurePosixPath(r).parents if str(p) != "."}


@settings(max_examples=150, deadline=None)
@given(st.lists(_relpath, min_size=1, max_size=12, unique=True), st.sampled_from(sorted(SUFFIX)))
def test_mapping_is_injective_case_insensitively(rels, fmt):
    # Inputs that differ only in case may both exist on Linux; on macOS/Windows they are one file,
    # so the mapping must not depend on that either: it is computed for the set as given.
    names = output_names(rels, fmt)
    assert set(names) == set(rels)
    outs = [n.casefold() for n in names.values()]
    assert len(set(outs)) == len(outs), names
    assert not set(outs) & _folders(rels), names  # no output is also an output folder
    for rel, out in names.items():
        assert PurePosixPath(out).parent == PurePosixPath(rel).parent  # the layout is mirrored
        assert out.endswith(f".deploy{SUFFIX[fmt]}")
    # A function of the set: the order in which the folder was listed does not matter.
    shuffled = list(rels)
    random.Random(len(rels)).shuffle(shuffled)
    assert output_names(shuffled, fmt) == names


@settings(max_examples=100, deadline=None)
@given(st.lists(_relpath, min_size=1, max_size=8, unique=True))
def test_plain_names_are_kept_when_nothing_clashes(rels):
    """An input keeps `stem.deploy...` unless another input of its folder shares its stem, or has a
    name equal to its stem, or a folder has that name (all compared case-folded)."""
    names = output_names(rels, "safetensors")
    for r in rels:
        p = PurePosixPath(r)
        key = (str(p.parent).casefold(), p.stem.casefold())
        others = [PurePosixPath(o) for o in rels if o != r]
        clash = any((str(o.parent).casefold(), o.stem.casefold()) == key or
                    (str(o.parent).casefold(), o.name.casefold()) == key for o in others)
        preferred = str(p.parent / f"{p.stem}.deploy.safetensors")
        if not clash and preferred.casefold() not in _folders(rels):
            assert names[r] == preferred, (r, names)
    assert output_names(["a.pth", "b/c.pt"], "safetensors") == {"a.pth": "a.deploy.safetensors",
                                                               "b/c.pt": "b/c.deploy.safetensors"}


def test_the_issue_collisions():
    names = output_names(["x.pth", "x.bin", "x.pth.bin", "X.pth", "A/m.pth", "a/m.pth"], "safetensors")
    assert names["x.bin"] == "x.bin.deploy.safetensors" and names["x.pth.bin"] == "x.pth.bin.deploy.safetensors"
    outs = [n.casefold() for n in names.values()]
    assert len(set(outs)) == len(outs)
    # Case variants keep their full name plus a hash of their path: distinct, stable.
    assert names["X.pth"].startswith("X.pth.") and names["x.pth"].startswith("x.pth.")
    assert names["A/m.pth"] != names["a/m.pth"]


def test_colliding_inputs_get_distinct_correct_outputs(tmp_path):
    """x.pth, x.bin and x.pth.bin hold different weights: each output holds its own input's weights,
    also with --overwrite and --resume (where a collision used to exit 0 with one file's weights lost)."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for seed, name in enumerate(["x.pth", "x.bin", "x.pth.bin"]):
        init_checkpoint(str(spec), src / name, seed=seed)
    for extra in ((), ("--overwrite",), ("--resume",)):
        result = run_cli("batch", src, "--spec", spec, "-o", out, "--no-verify", "--json", *extra)
        assert result.exit_code == 0, result.stderr
        files = {e["relpath"]: e for e in json.loads(result.stdout)["files"]}
        assert len({e["output"] for e in files.values()}) == 3
    deployed = {rel: load_file(files[rel]["output"]) for rel in files}
    # Different seeds give different fused weights: no output holds another input's.
    first = {rel: next(iter(sorted(d.items())))[1] for rel, d in deployed.items()}
    assert not torch.equal(first["x.pth"], first["x.bin"]) and not torch.equal(first["x.pth"], first["x.pth.bin"])
    from safetensors import safe_open

    for e in files.values():  # each output records the checksum of its own input
        with safe_open(e["output"], "pt") as f:
            assert f.metadata()[META_PREFIX + "source_sha256"] == e["input_sha256"]
