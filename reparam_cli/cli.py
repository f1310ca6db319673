"""The `reparam` command line: a thin Typer skin over `reparam_cli.pipeline`.

Exit codes: 0 ok; 1 verification failed; 2 bad usage or bad input (one line on stderr, no
traceback). Machine output (`--json`) goes to stdout; everything meant for people goes to stderr.
torch is imported only inside commands, so `reparam --help` answers at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from ._version import __version__
from .signals import Interrupted, interrupts_as_exceptions

app = typer.Typer(
    name="reparam",
    help="Convert training checkpoints of structurally re-parameterized networks (RepVGG, ACNet, DBB, "
         "RepMLP, MobileOne, ...) into their fused deploy form, verified on random inputs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2

SpecOpt = typer.Option(..., "--spec", "-s", help="Model spec: a built-in name (see `reparam specs`), a YAML file, "
                                                 "a Python file exposing build_model() (file.py\\[:function]), or "
                                                 "timm:MODEL\\[?arg=value&...] (needs the timm extra).")
JsonOpt = typer.Option(False, "--json", help="Print exactly one JSON object on stdout instead of a table on stderr.")
RtolOpt = typer.Option(None, "--rtol", help="Relative tolerance, scaled by the output's magnitude "
                                            "\\[default: 1e-4 for float32, 2e-2 for float16].", min=0.0)
AtolOpt = typer.Option(None, "--atol", help="Absolute tolerance added to rtol * max|output| \\[default: 1e-6 for float32].",
                       min=0.0)
SeedOpt = typer.Option(0, "--seed", help="Seed of the random verification inputs.")
SamplesOpt = typer.Option(1, "--samples", help="Number of random batches to verify on.", min=1)
ShapeOpt = typer.Option(None, "--input-shape", help="Verification input shape, e.g. 2,3,64,64 "
                                                    "\\[default: the spec's input_shape].")
NoVerifyOpt = typer.Option(False, "--no-verify", help="Skip the equivalence check (not recommended).")
TrustOpt = typer.Option(False, "--trust-pickle", help="Load torch checkpoints with full unpickling. Only for files "
                                                      "you trust: a pickle can run arbitrary code.")
EmaOpt = typer.Option(False, "--ema", help="Use the checkpoint's EMA weights (state_dict_ema / model_ema / ema) "
                                           "instead of its training weights.")
DtypeOpt = typer.Option(None, "--dtype", help="Dtype of the written deploy model: float32, float16 or bfloat16 "
                                              "\\[default: the checkpoint's]. Fusion always runs in float64.")
FormatOpt = typer.Option("safetensors", "--format", "-f", help="Output format: safetensors, torchscript, pt2 "
                         "(torch.export) or onnx (needs the onnx extra; checked in onnxruntime).")

LinearAsConvOpt = typer.Option(False, "--linear-as-conv", help="Also turn nn.Linear layers into equivalent pointwise "
                                                               "(1x1) conv modules (paradigm 9).")


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} x{v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return "; ".join(str(v) for v in value) or "-"
    return str(value)


def _summary(title: str, report: dict, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table

    ok = report.get("ok", True)
    table = Table(title=f"{title}: [{'green' if ok else 'red'}]{'OK' if ok else 'FAILED'}[/]", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, key in rows:
        if key in report and report[key] is not None and report[key] != []:
            table.add_row(label, _fmt(report[key]))
    worst = report.get("worst_block")
    if worst:
        table.add_row("worst block", f"{worst['path']} ({worst['type']}): {worst['max_rel_err']:.3g}")
    if report.get("failed_blocks"):
        table.add_row("failed blocks", ", ".join(report["failed_blocks"][:5]))
    _stderr().print(table)


CONVERT_ROWS = [
    ("input", "input"), ("output", "output"), ("spec", "spec"), ("format", "format"), ("dtype", "dtype"),
    ("blocks", "blocks"), ("params before", "params_before"), ("params after", "params_after"),
    ("FLOPs before", "flops_before"), ("FLOPs after", "flops_after"),
    ("max abs err", "max_abs_err"), ("max rel err", "max_rel_err"), ("cosine", "cosine"),
    ("training-model rel err (float floor)", "train_rel_err"), ("tolerance rtol/atol", "tolerance"),
    ("checkpoint dtype", "checkpoint_dtype"), ("native blocks", "native_blocks"),
    ("exported file checked in", "export_runtime"), ("exported vs deploy rel err", "export_max_rel_err"),
    ("notes", "notes"),
]


def _guarded(action: Callable[[], Any], as_json: bool) -> Any:
    """Run `action`, mapping user errors to exit 2 with one line on stderr: never a traceback (unless
    REPARAM_DEBUG is set). Every command goes through here."""
    from .errors import ReparamError

    try:
        return action()
    except ReparamError as exc:
        _fail(str(exc), as_json)
    except (KeyboardInterrupt, Interrupted) as exc:
        _interrupted(exc, as_json)
    except typer.Exit:
        raise
    except Exception as exc:
        if os.environ.get("REPARAM_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
              "(set REPARAM_DEBUG=1 for a traceback)", as_json)


def _run(action: Callable[[Callable[[str], None]], dict], as_json: bool, title: str, rows) -> None:
    """Run a pipeline action, print its report, map errors to exit codes."""
    from .errors import VerificationFailed

    console = _stderr()
    status = None
    if not as_json and console.is_terminal:
        status = console.status(f"{title}...")
        status.start()

    def progress(msg: str) -> None:
        if status is not None:
            status.update(f"{title}: {msg}...")

    def attempt() -> tuple[dict, int]:
        try:
            return action(progress), EXIT_OK
        except VerificationFailed as exc:
            if not as_json:
                console.print(f"[red]error:[/] {exc}")
            return exc.report, EXIT_MISMATCH

    try:
        report, code = _guarded(attempt, as_json)
    finally:
        if status is not None:
            status.stop()
    if "rtol" in report:
        report["tolerance"] = f"{report['rtol']:.3g} / {report['atol']:.3g}"
    if as_json:
        report.pop("tolerance", None)
        typer.echo(json.dumps(report, default=str))
    else:
        _summary(title, report, rows)
    raise typer.Exit(code)


def _interrupted(exc: BaseException, as_json: bool = False) -> None:
    """A signal stopped the command (cleanup has run): one line, exit 128 + the signal (130 for Ctrl-C)."""
    import signal

    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    message = f"interrupted by {signal.Signals(signum).name} (no partial output is left behind)"
    typer.echo(f"error: {message}", err=True)
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": message}))
    raise typer.Exit(128 + signum)


def _fail(message: str, as_json: bool) -> None:
    typer.echo(f"error: {message}", err=True)
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": message}))
    raise typer.Exit(EXIT_BAD_INPUT)


def _verify_options(samples: int, seed: int, rtol, atol, input_shape):
    from .pipeline import VerifyOptions
    from .spec import parse_shape

    return VerifyOptions(samples=samples, seed=seed, rtol=rtol, atol=atol,
                         input_shape=parse_shape(input_shape) if input_shape else None)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"reparam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Show the version and exit.", callback=_version_callback,
                                 is_eager=True),
) -> None:
    """Convert, verify and inspect re-parameterizable network checkpoints."""


@app.command()
def init(
    spec: str = typer.Argument(..., help="Model spec: built-in name, YAML file or Python file."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint to write (.pth or .safetensors)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random weights and BatchNorm statistics."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    as_json: bool = JsonOpt,
) -> None:
    """Write a training-form checkpoint with random weights and randomized BatchNorm statistics."""

    def action(progress):
        from .pipeline import init_checkpoint

        progress("building model")
        return init_checkpoint(spec, output, seed=seed, overwrite=overwrite)

    _run(action, as_json, "init", [("output", "output"), ("spec", "spec"), ("params", "params"), ("seed", "seed")])


@app.command()
def convert(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint (.pth/.pt/.bin, Lightning .ckpt, .safetensors), "
                                                "or - for stdin."),
    spec: str = SpecOpt,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Deploy file to write, or - for stdout \\[default: "
                                          "<input stem>.deploy.safetensors (.pt, .pt2, .onnx) beside the input]."),
    fmt: str = FormatOpt,
    dtype: Optional[str] = DtypeOpt,
    ema: bool = EmaOpt,
    no_verify: bool = NoVerifyOpt,
    rtol: Optional[float] = RtolOpt,
    atol: Optional[float] = AtolOpt,
    seed: int = SeedOpt,
    samples: int = SamplesOpt,
    input_shape: Optional[str] = ShapeOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    trust_pickle: bool = TrustOpt,
    as_json: bool = JsonOpt,
    linear_as_conv: bool = LinearAsConvOpt,
) -> None:
    """Fuse every re-parameterizable block, verify the result, and write the deploy model.

    `-` reads the checkpoint from stdin, `-o -` writes the deploy file to stdout (after verification).
    """
    _refuse_json_on_stdout(output, as_json)

    def action(progress):
        import contextlib

        from .pipes import convert_stdio, is_stdio, stdout_to_stderr

        # stdout is for the JSON report: no stray prints (with -o -, convert_stdio guards the file itself)
        with contextlib.nullcontext() if is_stdio(output) else stdout_to_stderr():
            return convert_stdio(
                checkpoint, spec, output, fmt=fmt, verify_output=not no_verify,
                verify_options=_verify_options(samples, seed, rtol, atol, input_shape), overwrite=overwrite,
                trust_pickle=trust_pickle, progress=progress, linear_as_conv=linear_as_conv, dtype=dtype, ema=ema,
            )

    _run(action, as_json, "convert", CONVERT_ROWS)


@app.command()
def verify(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint."),
    deployed: Path = typer.Argument(..., help="Deploy file: safetensors written by reparam, TorchScript (.pt), "
                                              "torch.export (.pt2) or ONNX (.onnx)."),
    spec: str = SpecOpt,
    rtol: Optional[float] = RtolOpt,
    atol: Optional[float] = AtolOpt,
    seed: int = SeedOpt,
    samples: int = SamplesOpt,
    input_shape: Optional[str] = ShapeOpt,
    trust_pickle: bool = TrustOpt,
    ema: bool = EmaOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Check that a deploy file computes the same function as a training checkpoint (exit 1 if not)."""

    def action(progress):
        from .errors import VerificationFailed
        from .pipeline import verify_checkpoint

        report = verify_checkpoint(checkpoint, deployed, spec,
                                   verify_options=_verify_options(samples, seed, rtol, atol, input_shape),
                                   trust_pickle=trust_pickle, progress=progress, ema=ema)
        if not report["ok"]:
            raise VerificationFailed("the deploy file does not match the training checkpoint", report)
        return report

    _run(action, as_json, "verify", CONVERT_ROWS)


@app.command()
def specs(
    as_json: bool = JsonOpt,
    params: bool = typer.Option(True, "--params/--no-params", help="Count parameters before and after conversion "
                                                                   "(shape-only builds on the meta device; fast)."),
) -> None:
    """List the built-in model specs: name, family, description and parameters before -> after conversion.

    The listing is this command's product, so the table goes to stdout (like --json).
    """
    from .pipeline import list_specs

    rows = list_specs(params=params)
    if as_json:
        typer.echo(json.dumps({"ok": True, "specs": rows}))
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


def _refuse_json_on_stdout(output: Optional[Path], as_json: bool) -> None:
    """With `-o -`, stdout carries the deploy file: a JSON report there would corrupt it."""
    if as_json and output is not None and str(output) == "-":
        _fail("--json cannot be combined with -o - (stdout carries the deploy file)", as_json=False)


@app.command()
def batch(
    input_dir: Path = typer.Argument(..., help="Folder of training checkpoints."),
    spec: str = SpecOpt,
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Folder for the deploy files (the input "
                                    "layout is mirrored) and manifest.jsonl; created if missing."),
    pattern: Optional[list[str]] = typer.Option(None, "--pattern", "-p", help="File-name glob to convert, repeatable "
                                                "(a glob with / matches the relative path); "
                                                "default: *.pth *.pt *.ckpt *.safetensors *.bin."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also convert checkpoints in subfolders."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=0, help="Conversions in parallel (processes); 0: one per core."),
    fmt: str = typer.Option("safetensors", "--format", "-f", help="Output format: safetensors or torchscript."),
    resume: bool = typer.Option(False, "--resume", help="Skip inputs the manifest records as converted from the same "
                                "bytes (sha256) whose output is unchanged; reconvert the rest, replacing stale outputs."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Convert only shard K of N (K from 0), e.g. "
                                        "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; shards partition "
                                        "the inputs and write manifest.shard-K-of-N.jsonl."),
    no_verify: bool = NoVerifyOpt,
    rtol: Optional[float] = RtolOpt,
    atol: Optional[float] = AtolOpt,
    seed: int = SeedOpt,
    samples: int = SamplesOpt,
    input_shape: Optional[str] = ShapeOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    trust_pickle: bool = TrustOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary (with every manifest line) on stdout."),
) -> None:
    """Convert every checkpoint in a folder (in parallel, resumable, shardable), keeping going past
    failures. Exit 0 when all were converted or skipped, 1 when any failed."""
    console = _stderr()
    reporter = None

    def action() -> dict:
        nonlocal reporter
        from .batch import ConvertOptions, Reporter, Shard, run_batch
        from .pipes import stdout_to_stderr
        from .spec import load_spec

        with stdout_to_stderr():  # a Python spec may print on import: stdout is for --json
            spec_ = load_spec(spec)
        options = ConvertOptions(spec_, fmt, not no_verify,
                                 _verify_options(samples, seed, rtol, atol, input_shape), overwrite, trust_pickle)
        shard_ = Shard.parse(shard)
        reporter = None if as_json else Reporter(console)
        try:
            return run_batch(input_dir, output_dir, options, patterns=pattern or (), recursive=recursive,
                             jobs=jobs, resume=resume, shard=shard_,
                             on_start=reporter.start if reporter else (lambda plan: None),
                             on_result=reporter.result if reporter else (lambda entry: None))
        finally:
            if reporter is not None:
                reporter.stop()

    report = _guarded(action, as_json)
    if as_json:
        typer.echo(json.dumps(report, default=str))
    else:
        reporter.summary(report)
    raise typer.Exit(EXIT_OK if report["ok"] else EXIT_MISMATCH)


INSPECT_ROWS = [
    ("input", "input"), ("format", "format"), ("kind", "kind"), ("size (bytes)", "size_bytes"),
    ("tensors", "tensors"), ("dtypes", "dtypes"), ("parameters", "parameters"), ("spec", "spec"),
    ("blocks", "blocks"), ("params before", "params_before"), ("params after", "params_after"),
]


def _inspect_tables(report: dict) -> None:
    from rich.table import Table

    console = _stderr()
    table = Table(title="inspect", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, key in INSPECT_ROWS:
        if report.get(key) is not None:
            table.add_row(label, _fmt(report[key]))
    for key, value in (report.get("reparam") or {}).items():
        if value is not None:
            table.add_row(f"deploy {key.replace('_', ' ')}", ("yes" if value else "no") if isinstance(value, bool)
                          else _fmt(value))
    console.print(table)
    if report.get("block_list"):
        blocks = Table(title="re-parameterizable blocks", title_justify="left")
        for column in ("path", "type", "family"):
            blocks.add_column(column)
        blocks.add_column("params before", justify="right")
        blocks.add_column("params after", justify="right")
        for b in report["block_list"]:
            blocks.add_row(b["path"] or "<root>", b["type"], b["family"], _fmt(b["params_before"]),
                           _fmt(b["params_after"]))
        console.print(blocks)


@app.command()
def inspect(
    checkpoint: Path = typer.Argument(..., help="Checkpoint or deploy file (torch or safetensors), or - for stdin."),
    spec: Optional[str] = typer.Option(None, "--spec", "-s", help="Model spec: also list the re-parameterizable "
                                       "blocks and the parameters before/after (nothing is computed or written)."),
    trust_pickle: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show what a checkpoint holds (format, dtypes, tensors, parameters) and, with --spec, what
    converting it would do. A reparam deploy file is recognised and its stored spec used."""

    def action() -> dict:
        from .inspection import inspect_checkpoint
        from .pipes import stdout_to_stderr

        with stdout_to_stderr():  # stdout is for --json: no stray prints from a Python spec
            return inspect_checkpoint(checkpoint, spec, trust_pickle=trust_pickle)

    report = _guarded(action, as_json)
    if as_json:
        typer.echo(json.dumps(report, default=str))
    else:
        _inspect_tables(report)


def main() -> None:
    """Console-script entry point."""
    # Fusion allocates large float64 buffers; backing them with transparent huge pages cuts the
    # page-fault cost of each allocation 2-3x (read by torch's CPU allocator, so set before import).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        # SIGTERM (job schedulers) and SIGHUP (a closed terminal) stop a command as Ctrl-C does:
        # temporaries removed, exit 128 + signal with one line (see signals.py).
        with interrupts_as_exceptions():
            app()
    except BrokenPipeError:  # e.g. `reparam ... --json | head`
        sys.stderr.close()
        sys.exit(EXIT_BAD_INPUT)
    except Interrupted as exc:  # a signal outside a command's guard (while starting up)
        with contextlib.suppress(Exception):
            sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
