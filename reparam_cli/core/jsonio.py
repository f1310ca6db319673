"""Strict JSON for machine output: `--json` reports and manifest lines never carry the NaN/Infinity
tokens that Python's json module writes by default (and `jq`, JavaScript or `json.loads(...,
parse_constant=...)` reject). A non-finite number becomes `null`, and the object says why in a
`nonfinite` field mapping each such value's path to "nan", "inf" or "-inf"."""

from __future__ import annotations

import json
import math
from typing import Any


def _finite(value: Any, path: str, found: dict[str, str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found[path] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def replace_nonfinite(value: Any, found: dict[str, str]) -> Any:
    """`value` (nested dicts, lists, tuples) with every NaN/Inf float replaced by None; each one's
    path (`a.b`, `a[0].b`) is added to `found`, mapped to "nan", "inf" or "-inf"."""
    return _finite(value, "", found)


def strict(report: Any) -> Any:
    """`report` with non-finite floats replaced by None; a dict gains `nonfinite` {path: why} when any were."""
    found: dict[str, str] = {}
    clean = replace_nonfinite(report, found)
    if found and isinstance(clean, dict):
        clean["nonfinite"] = {**(clean.get("nonfinite") or {}), **found}
    return clean


def dumps(report: Any, **kwargs: Any) -> str:
    """json.dumps of `strict(report)`: strict JSON (objects it cannot encode are written as str)."""
    return json.dumps(strict(report), allow_nan=False, default=str, **kwargs)
