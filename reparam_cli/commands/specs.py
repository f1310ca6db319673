"""`reparam specs`: list the built-in model specs."""

from __future__ import annotations

import typer

from reparam_cli.commands.common import JsonOpt, echo_json



SHORT_HELP = 'List the built-in model specs (on stdout).'


def specs(
    as_json: bool = JsonOpt,
    params: bool = typer.Option(False, "--params/--no-params", help="Count parameters before and after conversion "
                                                                    "(models built on the meta device, without data: "
                                                                    "a few seconds, torch imported); without it the "
                                                                    "listing reads the spec files alone (well under a "
                                                                    "second)."),
) -> None:
    """List the built-in model specs: name, family, description (and, with --params, parameters before -> after conversion).

    The listing is this command's product, so the table goes to stdout (like --json).

    Examples:

    
      reparam specs
      reparam specs --params --json
    """
    if params:
        from reparam_cli.pipeline.conversion import list_specs

        rows = list_specs(params=True)
    else:  # torch-free: the spec files' own data
        from reparam_cli.pipeline.specs import list_builtin

        rows = list_builtin()
    if as_json:
        echo_json({"ok": True, "specs": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="built-in specs", title_justify="left")
    for column in ("spec", "family", "params (M)", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        counts = "-"
        if "params_before" in row:
            counts = f"{row['params_before'] / 1e6:.2f} -> {row['params_after'] / 1e6:.2f}"
        table.add_row(row["name"], row.get("family") or "-", counts,
                      row.get("description", "") if "error" not in row else f"[red]error:[/] {row['error']}")
    Console(highlight=False).print(table)
