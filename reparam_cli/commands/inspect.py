"""`reparam inspect`: what a checkpoint holds and what converting it would do."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from reparam_cli.commands.common import (JsonOpt, TrustOpt, TrustSpecOpt, echo_json, fmt_value, guarded, precheck,
                                         stderr_console)



SHORT_HELP = 'Show what a checkpoint holds and what converting it would do.'


INSPECT_ROWS = [
    ("input", "input"), ("format", "format"), ("kind", "kind"), ("size (bytes)", "size_bytes"),
    ("tensors", "tensors"), ("dtypes", "dtypes"), ("parameters", "parameters"), ("spec", "spec"),
    ("layout", "layout"), ("reference layout", "reference_layout"), ("blocks", "blocks"), ("graph regions", "graph_regions"), ("completeness", "completeness"),
    ("params before", "params_before"), ("params after", "params_after"),
]


def _inspect_tables(report: dict) -> None:
    from rich.table import Table

    console = stderr_console()
    table = Table(title="inspect", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, key in INSPECT_ROWS:
        if key == "kind" and report.get("kind_detail"):  # "deploy form (reference layout?): ..."
            table.add_row(label, report["kind_detail"])
        elif report.get(key) is not None:
            table.add_row(label, fmt_value(report[key]))
    for key, value in (report.get("reparam") or {}).items():
        if value is not None:
            table.add_row(f"deploy {key.replace('_', ' ')}", ("yes" if value else "no") if isinstance(value, bool)
                          else fmt_value(value))
    console.print(table)
    if report.get("block_list"):
        blocks = Table(title="re-parameterizable blocks", title_justify="left")
        for column in ("path", "type", "family"):
            blocks.add_column(column)
        blocks.add_column("params before", justify="right")
        blocks.add_column("params after", justify="right")
        for b in report["block_list"]:
            blocks.add_row(b["path"] or "<root>", b["type"], b["family"], fmt_value(b["params_before"]),
                           fmt_value(b["params_after"]))
        console.print(blocks)
    for title, key, columns in (("graph regions (folded)", "regions", ("path", "layer", "before", "after")),
                                ("left after conversion", "remaining", ("path", "kind", "reason"))):
        if report.get(key):
            table = Table(title=title, title_justify="left")
            for column in columns:
                table.add_column(column, overflow="fold")
            for row in report[key]:
                table.add_row(*[str(row[c] or "<root>") for c in columns])
            console.print(table)


def inspect(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Checkpoint or deploy file (torch or safetensors), or - for stdin."),
    spec: Optional[str] = typer.Option(None, "--spec", "-s", metavar="SPEC", help="Model spec: also list the re-parameterizable "
                                       "blocks and the parameters before/after (nothing is computed or written)."),
    trust_pickle: bool = TrustOpt,
    trust_spec: bool = TrustSpecOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show what a checkpoint holds (format, dtypes, tensors, parameters) and, with --spec, what
    converting it would do. A reparam deploy file is recognised and its stored spec used; a plain
    state dict of a fused model (a reference implementation's deploy layout, or reparam's) is
    recognised with --spec, and without it called "deploy form (reference layout?)" when none of
    its keys names a training branch.

    Shape-only: nothing is computed or written. The tables go to stderr (--json: one JSON object
    on stdout).

    Examples:

    
      reparam inspect a0.pth --spec repvgg-a0
      reparam inspect a0.deploy.safetensors --json
      reparam inspect m0_fused.pth.tar --spec repnext-m0
    """

    precheck(as_json, spec, (checkpoint,))

    def action() -> dict:
        from reparam_cli.pipeline.inspection import inspect_checkpoint
        from reparam_cli.pipeline.stdio import stdout_to_stderr

        with stdout_to_stderr():  # stdout is for --json: no stray prints from a Python spec
            return inspect_checkpoint(checkpoint, spec, trust_pickle=trust_pickle, trust_spec=trust_spec)

    report = guarded(action, as_json, about=checkpoint)
    if as_json:
        echo_json(report)
    else:
        _inspect_tables(report)
