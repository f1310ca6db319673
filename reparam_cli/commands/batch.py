"""`reparam batch`: convert every checkpoint in a folder (parallel, resumable, shardable)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from reparam_cli.commands.common import (AtolOpt, DynamicShapesOpt, EXIT_MISMATCH, EXIT_OK, LayoutOpt, AllowNonfiniteOpt, NoGraphOpt,
                                         NoVerifyOpt, RtolOpt, SamplesOpt, SeedOpt, ShapeOpt, SpecOpt, TrustOpt,
                                         echo_json, guarded, precheck, stderr_console, verify_options)



SHORT_HELP = 'Convert every checkpoint in a folder (parallel, resumable, shardable).'


def batch(
    input_dir: Path = typer.Argument(..., metavar="INPUT_DIR", help="Folder of training checkpoints."),
    spec: str = SpecOpt,
    output_dir: Path = typer.Option(..., "--output-dir", "-o", metavar="DIR", help="Folder for the deploy files (the input "
                                    "layout is mirrored) and manifest.jsonl; created if missing."),
    pattern: Optional[list[str]] = typer.Option(None, "--pattern", "-p", metavar="GLOB", help="File-name glob to convert, repeatable "
                                                "(a glob with / matches the relative path); "
                                                "default: *.pth *.pt *.ckpt *.safetensors *.bin."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also convert checkpoints in subfolders."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=0, metavar="N", help="Conversions in parallel (processes); 0: one per core."),
    fmt: str = typer.Option("safetensors", "--format", "-f", metavar="FORMAT", help="Output format: safetensors, "
                            "torchscript, pt2 (torch.export) or onnx (needs the onnx extra)."),
    resume: bool = typer.Option(False, "--resume", help="Skip inputs the manifest records as converted from the same "
                                "bytes (sha256) whose output is unchanged; reconvert the rest, replacing stale outputs."),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="K/N", help="Convert only shard K of N (K from 0), e.g. "
                                        "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; shards partition "
                                        "the inputs, and each writes its own manifest file."),
    no_verify: bool = NoVerifyOpt,
    rtol: Optional[float] = RtolOpt,
    atol: Optional[float] = AtolOpt,
    seed: int = SeedOpt,
    samples: int = SamplesOpt,
    input_shape: Optional[str] = ShapeOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    trust_pickle: bool = TrustOpt,
    allow_nonfinite: bool = AllowNonfiniteOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary (with every manifest line) on stdout."),
    dynamic_shapes: str = DynamicShapesOpt,
    no_graph: bool = NoGraphOpt,
    layout: str = LayoutOpt,
    strict: bool = typer.Option(False, "--strict", help="Count a checkpoint as failed (nothing written for it) when "
                                "anything foldable is left in it: BatchNorms, untraceable modules, unfoldable regions."),
) -> None:
    """Convert every checkpoint in a folder (in parallel, resumable, shardable), keeping going past
    failures. Exit 0 when all were converted or skipped, 1 when any failed.

    Deploy files and manifest.jsonl go to -o DIR (the input layout mirrored); progress and one line
    per file go to stderr (--json: one summary object on stdout).

    Examples:

    
      reparam batch runs/ --spec repvgg-a0 -o deploy/ --recursive --jobs 4
      reparam batch runs/ --spec repvgg-a0 -o deploy/ -r --resume --shard 0/8
    """
    precheck(as_json, spec, extras=(("onnx", "--format onnx"),) if fmt == "onnx" else (), folder=input_dir)
    console = stderr_console()
    reporter = None

    def action() -> dict:
        nonlocal reporter
        from reparam_cli.pipeline.options import ConvertOptions
        from reparam_cli.pipeline.batch import Reporter, Shard, run_batch
        from reparam_cli.pipeline.stdio import stdout_to_stderr
        from reparam_cli.pipeline.specs import load_spec

        with stdout_to_stderr():  # a Python spec may print on import: stdout is for --json
            spec_ = load_spec(spec)
        options = ConvertOptions.of(fmt=fmt, verify=not no_verify,
                                    verify_options=verify_options(samples, seed, rtol, atol, input_shape),
                                    overwrite=overwrite, trust_pickle=trust_pickle, dynamic_shapes=dynamic_shapes,
                                    graph=not no_graph, layout=layout, strict=strict,
                                    allow_nonfinite=allow_nonfinite)
        shard_ = Shard.parse(shard)
        reporter = None if as_json else Reporter(console)
        try:
            return run_batch(input_dir, output_dir, spec_, options, patterns=pattern or (), recursive=recursive,
                             jobs=jobs, resume=resume, shard=shard_,
                             on_start=reporter.start if reporter else (lambda plan: None),
                             on_result=reporter.result if reporter else (lambda entry: None))
        finally:
            if reporter is not None:
                reporter.stop()

    report = guarded(action, as_json)
    if as_json:
        echo_json(report)
    else:
        reporter.summary(report)
    raise typer.Exit(EXIT_OK if report["ok"] else EXIT_MISMATCH)
