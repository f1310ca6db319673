"""`reparam specs` and scripts/spec_table.py: every built-in spec listed with family, description and
parameters before -> after; every spec file well formed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from reparam_cli.commands.app import app
from reparam_cli.pipeline.conversion import list_specs
from reparam_cli.pipeline.specs import SPECS_DIR, builtin_names

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return list_specs(params=True)


def test_every_spec_file_is_complete():
    for name in builtin_names():
        data = yaml.safe_load((SPECS_DIR / f"{name}.yaml").read_text())
        assert data["name"] == name
        for key in ("description", "family", "builder", "args", "input_shape"):
            assert data.get(key), (name, key)


def test_specs_json(rows):
    result = CliRunner().invoke(app, ["specs", "--json", "--params"])
    assert result.exit_code == 0, result.stderr
    listed = json.loads(result.stdout)  # exactly one JSON object
    assert listed["ok"] and listed["specs"] == rows
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(builtin_names())
    assert not any("error" in r for r in rows)
    assert all(r["family"] and r["description"] and r["params_after"] > 0 for r in rows)
    assert (by_name["repvgg-a0"]["params_before"], by_name["repvgg-a0"]["params_after"]) == (9_108_968, 8_309_384)
    # 3,504,872 with the BatchNorms kept (--no-graph); the graph pass folds the 17 projection BNs.
    assert by_name["mobilenetv2-refconv"]["params_after"] == 3_494_952
    assert by_name["repmlpnet-t224"]["family"] == "repmlp" and by_name["repnext-tiny"]["family"] == "repnext"


def test_specs_table_without_params():
    result = CliRunner().invoke(app, ["specs", "--no-params"])
    assert result.exit_code == 0
    for name in builtin_names():
        assert name in result.stdout
    rows = list_specs(params=False)
    assert all("params_before" not in r and r["family"] for r in rows)
    # The default listing reads the files alone (no torch, no builds): the same rows.
    from reparam_cli.pipeline.specs import list_builtin

    assert list_builtin() == rows
    listed = json.loads(CliRunner().invoke(app, ["specs", "--json"]).stdout)["specs"]
    assert listed == rows


def test_spec_table_script(rows, capsys):
    spec = importlib.util.spec_from_file_location("spec_table", ROOT / "scripts" / "spec_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.markdown_table(rows).splitlines()
    assert table[0].startswith("| spec | family |") and len(table) == len(rows) + 2
    assert "| repvgg-a0 | repvgg | 9.11 -> 8.31 |" in table
    assert "| mobilenetv2-refconv | refconv | 44.05 -> 3.49 |" in table


def test_broken_spec_is_listed_with_its_error(tmp_path, monkeypatch):
    (tmp_path / "broken.yaml").write_text("name: broken\ndescription: x\nfamily: y\nbuilder: nowhere:nothing\n")
    monkeypatch.setattr("reparam_cli.pipeline.specs.SPECS_DIR", tmp_path)
    [row] = list_specs()
    assert row["name"] == "broken" and "cannot import" in row["error"]
