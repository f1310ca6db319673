"""`reparam init`: a random training checkpoint of a spec, to try things on."""

from __future__ import annotations

from pathlib import Path

import typer

from reparam_cli.commands.common import JsonOpt, precheck, run_action



SHORT_HELP = 'Write a random training checkpoint of a spec, to try things on.'


def init(
    spec: str = typer.Argument(..., metavar="SPEC", help="Model spec: built-in name, YAML file or Python file."),
    output: Path = typer.Option(..., "--output", "-o", metavar="FILE", help="Checkpoint to write (.pth or "
                                ".safetensors)."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed for the random weights and BatchNorm statistics (0 to 2**63-1).",
                             min=0, max=2**63 - 1),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    as_json: bool = JsonOpt,
) -> None:
    """Write a training-form checkpoint with random weights and randomized BatchNorm statistics.

    The checkpoint goes to -o; a summary goes to stderr (--json: one JSON object on stdout).

    Examples:

    
      reparam init repvgg-a0 -o a0.pth
      reparam init my_spec.yaml -o random.safetensors --seed 1
    """

    precheck(as_json, spec)

    def action(progress):
        from reparam_cli.pipeline.conversion import init_checkpoint

        progress("building model")
        return init_checkpoint(spec, output, seed=seed, overwrite=overwrite)

    run_action(action, as_json, "init", [("output", "output"), ("spec", "spec"), ("params", "params"), ("seed", "seed")])
