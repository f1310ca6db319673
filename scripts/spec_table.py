"""Print the README's markdown table of built-in specs: name, family, parameters before -> after.

    PYTHONPATH=. python scripts/spec_table.py

Parameter counts come from shape-only builds on the meta device (no weights are allocated).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reparam_cli.pipeline.conversion import list_specs  # noqa: E402


def markdown_table(rows: list[dict]) -> str:
    lines = ["| spec | family | params (M), training -> deploy |", "|---|---|---|"]
    for row in rows:
        if "error" in row:
            counts = f"error: {row['error']}"
        else:
            counts = f"{row['params_before'] / 1e6:.2f} -> {row['params_after'] / 1e6:.2f}"
        lines.append(f"| {row['name']} | {row.get('family') or '-'} | {counts} |")
    return "\n".join(lines)


def main() -> None:
    print(markdown_table(list_specs(params=True)))


if __name__ == "__main__":
    main()
