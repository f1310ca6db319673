"""The `reparam` command line: a thin Typer skin over `reparam_cli.pipeline`.

Exit codes: 0 ok; 1 verification failed; 2 bad usage or bad input (one line on stderr, no
traceback). Machine output (`--json`) goes to stdout; everything meant for people goes to stderr.
torch is imported only inside commands, so `reparam --help` answers at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import importlib

import typer
from typer.core import TyperGroup

from ._version import __version__
from .signals import Interrupted, interrupts_as_exceptions

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2
# click's exceptions, wherever this Typer takes click from (recent Typers vendor it as typer._click)
_click = importlib.import_module(typer.BadParameter.__module__)


class _ReparamGroup(TyperGroup):
    """Typer's group, except that a usage error is one `error:` line on stderr and exit 2, not
    click's usage block with a boxed panel (scripts and logs get one greppable line)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except getattr(_click, "NoArgsIsHelpError", ()) as exc:  # bare `reparam`: the help, as before
            if exc.format_message().strip():  # rich help has printed itself already
                typer.echo(exc.format_message())
            sys.exit(EXIT_BAD_INPUT)
        except _click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            typer.echo(f"error: {_one_line(exc.format_message())}{where}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except _click.ClickException as exc:
            typer.echo(f"error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except _click.Abort:
            typer.echo("error: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


app = typer.Typer(
    cls=_ReparamGroup,
    name="reparam",
    help="Convert training checkpoints of structurally re-parameterized networks (RepVGG, ACNet, DBB, "
         "RepMLP, MobileOne, ...) into their fused deploy form, verified on random inputs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: wraps at the terminal width, no truncation, no <type> column
    context_settings={"help_option_names": ["-h", "--help"]},
)


SpecOpt = typer.Option(..., "--spec", "-s", metavar="SPEC", help="Model spec: a built-in name (see `reparam specs`), a YAML file, "
                                                 "a Python file exposing build_model() (file.py[:function]), or "
                                                 "timm:MODEL[?arg=value&...] (needs the timm extra).")
JsonOpt = typer.Option(False, "--json", help="Print exactly one JSON object on stdout instead of a table on stderr.")
RtolOpt = typer.Option(None, "--rtol", metavar="X", help="Relative tolerance, scaled by the output's magnitude "
                                            "[default: 1e-4 for float32, 2e-2 for float16].", min=0.0)
AtolOpt = typer.Option(None, "--atol", metavar="X", help="Absolute tolerance added to rtol * max|output| [default: 1e-6 for float32].",
                       min=0.0)
SeedOpt = typer.Option(0, "--seed", metavar="N", help="Seed of the random verification inputs.")
SamplesOpt = typer.Option(1, "--samples", metavar="N", help="Number of random batches to verify on.", min=1)
ShapeOpt = typer.Option(None, "--input-shape", metavar="N,C,H,W", help="Verification input shape, e.g. 2,3,64,64 "
                                                    "[default: the spec's input_shape].")
NoVerifyOpt = typer.Option(False, "--no-verify", help="Skip the equivalence check (not recommended).")
TrustOpt = typer.Option(False, "--trust-pickle", help="Load torch checkpoints with full unpickling. Only for files "
                                                      "you trust: a pickle can run arbitrary code.")
TrustSpecOpt = typer.Option(False, "--trust-spec", help="Rebuild a deploy file from the spec stored in it even when "
                            "that spec names code other than reparam's or timm's builders (a module:function or a "
                            ".py file). Only for files you trust: it runs that code.")
EmaOpt = typer.Option(False, "--ema", help="Use the checkpoint's EMA weights (state_dict_ema / model_ema / ema) "
                                           "instead of its training weights.")
DtypeOpt = typer.Option(None, "--dtype", metavar="DTYPE", help="Dtype of the written deploy model: float32, float16 or bfloat16 "
                                              "[default: the checkpoint's]. Fusion always runs in float64.")
FormatOpt = typer.Option("safetensors", "--format", "-f", metavar="FORMAT", help="Output format: safetensors, torchscript, pt2 "
                         "(torch.export) or onnx (needs the onnx extra; checked in onnxruntime).")

DynamicShapesOpt = typer.Option("auto", "--dynamic-shapes", metavar="MODE", help="Dynamic input dims of pt2 and ONNX files: auto "
                                "(batch and height/width where the model allows, else batch, else static), batch, "
                                "or none (static); the report lists them (export_dynamic_dims).")
LinearAsConvOpt = typer.Option(False, "--linear-as-conv", help="Also turn nn.Linear layers into equivalent pointwise "
                                                               "(1x1) conv modules (paradigm 9).")
NoGraphOpt = typer.Option(False, "--no-graph", help="Convert only blocks with a recipe or a native method; do not "
                                                    "fold the other linear regions (conv+BN, branch sums, ...).")
StrictOpt = typer.Option(False, "--strict", help="Fail (exit 1, nothing written) when anything foldable is left: "
                                                 "BatchNorms, untraceable modules, unfoldable regions.")


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
        err = worst["max_rel_err"]  # None when NaN/Inf (strict JSON): say which
        shown = f"{err:.3g}" if err is not None else report.get("nonfinite_values", {}).get("worst_block.max_rel_err", "-")
        table.add_row("worst block", f"{worst['path']} ({worst['type']}): {shown}")
    if report.get("failed_blocks"):
        table.add_row("failed blocks", ", ".join(report["failed_blocks"][:5]))
    _stderr().print(table)


CONVERT_ROWS = [
    ("input", "input"), ("output", "output"), ("spec", "spec"), ("format", "format"), ("dtype", "dtype"),
    ("blocks", "blocks"), ("graph regions", "graph_regions"), ("completeness", "completeness"),
    ("params before", "params_before"), ("params after", "params_after"), ("FLOPs before", "flops_before"), ("FLOPs after", "flops_after"),
    ("max abs err", "max_abs_err"), ("max rel err", "max_rel_err"), ("cosine", "cosine"),
    ("training-model rel err (float floor)", "train_rel_err"), ("tolerance rtol/atol", "tolerance"),
    ("checkpoint dtype", "checkpoint_dtype"), ("native blocks", "native_blocks"),
    ("exported file checked in", "export_runtime"), ("exported vs deploy rel err", "export_max_rel_err"),
    ("dynamic dims", "export_dynamic_dims"), ("computed in", "compute_dtype"),
    ("fused weights' rounding (rel)", "weight_rounding_rel_err"), ("non-finite", "nonfinite"),
    ("plot", "plot"), ("notes", "notes"),
]


def _guarded(action: Callable[[], Any], as_json: bool) -> Any:
    """Run `action`, mapping user errors to exit 2 with one line on stderr: never a traceback (unless
    REPARAM_DEBUG is set). Every command goes through here.

    Meanwhile stdout is stderr (a spec's prints never reach the JSON report or the deploy file),
    and a spec or library calling sys.exit() is an error like any other, not a silent exit.
    """
    import contextlib

    from .errors import ReparamError

    try:
        with contextlib.redirect_stdout(sys.stderr):
            return action()
    except ReparamError as exc:
        _fail(str(exc), as_json)
    except (KeyboardInterrupt, Interrupted) as exc:
        _interrupted(exc, as_json)
    except typer.Exit:
        raise
    except SystemExit as exc:
        _fail(f"code run for the spec called sys.exit({exc.code!r})", as_json)
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
        _echo_json(report)
    else:
        _summary(title, report, rows)
    raise typer.Exit(code)


def _one_line(message: str) -> str:
    """A message on one line (an exception's text may span several)."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _echo_json(report: Any) -> None:
    """The one JSON object of --json on stdout: strict JSON (no NaN/Infinity tokens, see jsonio)."""
    from .jsonio import dumps

    typer.echo(dumps(report))


def _interrupted(exc: BaseException, as_json: bool = False) -> None:
    """A signal stopped the command (cleanup has run): one line, exit 128 + the signal (130 for Ctrl-C)."""
    import signal

    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    message = f"interrupted by {signal.Signals(signum).name} (no partial output is left behind)"
    typer.echo(f"error: {message}", err=True)
    if as_json:
        _echo_json({"ok": False, "error": message})
    raise typer.Exit(128 + signum)


def _fail(message: str, as_json: bool) -> None:
    message = _one_line(message)
    typer.echo(f"error: {message}", err=True)
    if as_json:
        _echo_json({"ok": False, "error": message})
    raise typer.Exit(EXIT_BAD_INPUT)


def _precheck(as_json: bool, spec: Optional[str] = None, inputs: tuple = (), extras: tuple = (),
              folder: Optional[Path] = None) -> None:
    """Torch-free checks before any work, so bad input is answered in a fraction of a second: the spec
    reference (unknown names get suggestions), that each input file (or the input folder) exists, and
    each needed (extra, feature)."""

    def check() -> None:
        from .errors import CheckpointError, ReparamError
        from .extras import require_extra
        from .spec import check_spec_ref

        if spec is not None:
            check_spec_ref(spec)
        for path in inputs:
            if str(path) != "-" and not Path(path).exists():
                raise CheckpointError(f"checkpoint not found: {path}")
        if folder is not None and not folder.exists():
            raise ReparamError(f"input folder not found: {folder}")
        for extra, feature in extras:
            require_extra(extra, feature)

    _guarded(check, as_json)


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


@app.command(short_help="Write a random training checkpoint of a spec, to try things on.")
def init(
    spec: str = typer.Argument(..., metavar="SPEC", help="Model spec: built-in name, YAML file or Python file."),
    output: Path = typer.Option(..., "--output", "-o", metavar="FILE", help="Checkpoint to write (.pth or "
                                ".safetensors)."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed for the random weights and BatchNorm statistics."),
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

    _precheck(as_json, spec)

    def action(progress):
        from .pipeline import init_checkpoint

        progress("building model")
        return init_checkpoint(spec, output, seed=seed, overwrite=overwrite)

    _run(action, as_json, "init", [("output", "output"), ("spec", "spec"), ("params", "params"), ("seed", "seed")])


@app.command(short_help="Fuse, verify and write the deploy model of a checkpoint.")
def convert(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Training checkpoint (.pth/.pt/.bin, Lightning .ckpt, .safetensors), "
                                                "or - for stdin."),
    spec: str = SpecOpt,
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE", help="Deploy file to write, or - for stdout [default: "
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
    dynamic_shapes: str = DynamicShapesOpt,
    no_graph: bool = NoGraphOpt,
    strict: bool = StrictOpt,
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png", help="Also draw the per-block errors against the tolerance "
                                        "to this PNG, even when verification fails (needs the plot extra)."),
    equalize: bool = typer.Option(False, "--equalize", help="Also apply exact cross-layer equalization (evens out "
                                  "per-channel weight ranges for int8; see `reparam quantize`)."),
) -> None:
    """Fuse every re-parameterizable block, verify the result, and write the deploy model.

    The deploy file goes to -o (default: beside the input), or to stdout with -o -; `-` reads the
    checkpoint from stdin. A summary table goes to stderr (--json: one JSON object on stdout).
    Exit 1 when verification fails (nothing is written), 2 on bad input.

    Examples:

    
      reparam convert a0.pth --spec repvgg-a0
      reparam convert a0.pth --spec repvgg-a0 -f onnx -o a0.onnx
      reparam convert best.pth --spec 'repvgg-a0?num_classes=10'
      reparam convert a0.pth --spec repvgg-a0 --input-shape 1,3,64,64
      reparam convert last.pth.tar --spec timm:mobileone_s0 --ema --plot err.png
    """
    _refuse_json_on_stdout(output, as_json)
    sink = sys.stdout.buffer  # the real stdout, for -o - (_guarded points sys.stdout at stderr)
    if plot is not None and no_verify:
        _fail("--plot draws the verification's figures: it cannot be combined with --no-verify", as_json)
    _precheck(as_json, spec, (checkpoint,), ((("onnx", "--format onnx"),) if fmt == "onnx" else ())
              + ((("plot", "--plot"),) if plot is not None else ()))

    def action(progress):
        import contextlib

        from .errors import VerificationFailed
        from .pipes import convert_stdio, is_stdio, stdout_to_stderr

        # stdout is for the JSON report: no stray prints (with -o -, convert_stdio guards the file itself)
        with contextlib.nullcontext() if is_stdio(output) else stdout_to_stderr():
            try:
                report = convert_stdio(
                    checkpoint, spec, output, stdout=sink, fmt=fmt, verify_output=not no_verify,
                    verify_options=_verify_options(samples, seed, rtol, atol, input_shape), overwrite=overwrite,
                    trust_pickle=trust_pickle, progress=progress, linear_as_conv=linear_as_conv, dtype=dtype, ema=ema,
                    dynamic_shapes=dynamic_shapes, graph=not no_graph, strict=strict, equalize=equalize,
                )
            except VerificationFailed as exc:
                _write_plot(exc.report, plot)  # a failing block is what the plot is for
                raise
        _write_plot(report, plot)
        return report

    _run(action, as_json, "convert", CONVERT_ROWS)


def _write_plot(report: dict, plot: Optional[Path]) -> None:
    if plot is not None:
        from .plot import write_plot

        report["plot"] = str(write_plot(report, plot))


@app.command(short_help="Check a deploy file against its training checkpoint (exit 1 if not equal).")
def verify(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Training checkpoint."),
    deployed: Path = typer.Argument(..., metavar="DEPLOYED", help="Deploy file: safetensors written by reparam, TorchScript (.pt), "
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
    """Check that a deploy file computes the same function as a training checkpoint (exit 1 if not).

    The figures go to stderr as a table (--json: one JSON object on stdout); nothing is written.

    Examples:

    
      reparam verify a0.pth a0.deploy.safetensors --spec repvgg-a0
      reparam verify a0.pth a0.onnx --spec repvgg-a0 --json
    """
    _precheck(as_json, spec, (checkpoint, deployed),
              (("onnx", "verifying an ONNX file"),) if deployed.suffix == ".onnx" else ())

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


@app.command(short_help="List the built-in model specs (on stdout).")
def specs(
    as_json: bool = JsonOpt,
    params: bool = typer.Option(True, "--params/--no-params", help="Count parameters before and after conversion "
                                                                   "(models built on the meta device, without data: fast)."),
) -> None:
    """List the built-in model specs: name, family, description and parameters before -> after conversion.

    The listing is this command's product, so the table goes to stdout (like --json).

    Examples:

    
      reparam specs
      reparam specs --json --no-params
    """
    from .pipeline import list_specs

    rows = list_specs(params=params)
    if as_json:
        _echo_json({"ok": True, "specs": rows})
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


@app.command(short_help="Convert every checkpoint in a folder (parallel, resumable, shardable).")
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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary (with every manifest line) on stdout."),
    dynamic_shapes: str = DynamicShapesOpt,
    no_graph: bool = NoGraphOpt,
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
    _precheck(as_json, spec, extras=(("onnx", "--format onnx"),) if fmt == "onnx" else (), folder=input_dir)
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
                                 _verify_options(samples, seed, rtol, atol, input_shape), overwrite, trust_pickle,
                                 dynamic_shapes=dynamic_shapes, graph=not no_graph, strict=strict)
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
        _echo_json(report)
    else:
        reporter.summary(report)
    raise typer.Exit(EXIT_OK if report["ok"] else EXIT_MISMATCH)


INSPECT_ROWS = [
    ("input", "input"), ("format", "format"), ("kind", "kind"), ("size (bytes)", "size_bytes"),
    ("tensors", "tensors"), ("dtypes", "dtypes"), ("parameters", "parameters"), ("spec", "spec"),
    ("blocks", "blocks"), ("graph regions", "graph_regions"), ("completeness", "completeness"),
    ("params before", "params_before"), ("params after", "params_after"),
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
    for title, key, columns in (("graph regions (folded)", "regions", ("path", "layer", "before", "after")),
                                ("left after conversion", "remaining", ("path", "kind", "reason"))):
        if report.get(key):
            table = Table(title=title, title_justify="left")
            for column in columns:
                table.add_column(column, overflow="fold")
            for row in report[key]:
                table.add_row(*[str(row[c] or "<root>") for c in columns])
            console.print(table)


@app.command(short_help="Show what a checkpoint holds and what converting it would do.")
def inspect(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Checkpoint or deploy file (torch or safetensors), or - for stdin."),
    spec: Optional[str] = typer.Option(None, "--spec", "-s", metavar="SPEC", help="Model spec: also list the re-parameterizable "
                                       "blocks and the parameters before/after (nothing is computed or written)."),
    trust_pickle: bool = TrustOpt,
    trust_spec: bool = TrustSpecOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show what a checkpoint holds (format, dtypes, tensors, parameters) and, with --spec, what
    converting it would do. A reparam deploy file is recognised and its stored spec used.

    Shape-only: nothing is computed or written. The tables go to stderr (--json: one JSON object
    on stdout).

    Examples:

    
      reparam inspect a0.pth --spec repvgg-a0
      reparam inspect a0.deploy.safetensors --json
    """

    _precheck(as_json, spec, (checkpoint,))

    def action() -> dict:
        from .inspection import inspect_checkpoint
        from .pipes import stdout_to_stderr

        with stdout_to_stderr():  # stdout is for --json: no stray prints from a Python spec
            return inspect_checkpoint(checkpoint, spec, trust_pickle=trust_pickle, trust_spec=trust_spec)

    report = _guarded(action, as_json)
    if as_json:
        _echo_json(report)
    else:
        _inspect_tables(report)


from .quantize.command import quantize as _quantize  # noqa: E402  (below the options it reuses)

app.command("quantize", short_help="int8 readiness: per-layer report, equalization, a verified int8 ONNX model.")(_quantize)


def _hold_stdout() -> None:
    """Keep the real stdout for reparam's own output only: sys.stdout writes to a private duplicate
    of it, while file descriptor 1 becomes stderr, so whatever else writes there (C extensions,
    subprocesses, a spec writing to fd 1) lands on stderr."""
    import io

    try:
        sys.stdout.flush()
        real = os.dup(1)
        os.dup2(2, 1)
    except (OSError, ValueError, AttributeError):
        return
    old = sys.stdout
    sys.stdout = io.TextIOWrapper(open(real, "wb", buffering=1 << 16), encoding=old.encoding, errors=old.errors,
                                  line_buffering=old.line_buffering)


def _release_stdout() -> None:
    """After the command: later writes (a spec's atexit handlers, interpreter shutdown) go to stderr."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    sys.stdout = sys.stderr


def main() -> None:
    """Console-script entry point."""
    # Fusion allocates large float64 buffers; backing them with transparent huge pages cuts the
    # page-fault cost of each allocation 2-3x (read by torch's CPU allocator, so set before import).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    _hold_stdout()
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
    finally:
        _release_stdout()


if __name__ == "__main__":
    main()
