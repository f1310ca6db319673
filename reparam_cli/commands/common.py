"""What every command shares: the options they have in common, how a command runs (`guarded`,
`run_action`: user errors become one `error:` line and exit 2, a failed verification exit 1, a
signal 128 + its number), the torch-free pre-checks, and the tables people read on stderr.

Exit codes: 0 ok; 1 verification failed; 2 bad usage or bad input (one line on stderr, no
traceback). Machine output (`--json`) goes to stdout; everything meant for people goes to stderr.
torch is imported only inside commands, so `reparam --help` answers at once.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from reparam_cli.core.messages import one_line
from reparam_cli.io.signals import Interrupted

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2


SpecOpt = typer.Option(..., "--spec", "-s", metavar="SPEC", help="Model spec: a built-in name (see `reparam specs`), a YAML file, "
                                                 "a Python file exposing build_model() (file.py[:function]), or "
                                                 "timm:MODEL[?arg=value&...] (needs the timm extra).")
JsonOpt = typer.Option(False, "--json", help="Print exactly one JSON object on stdout instead of a table on stderr.")
def _finite_tolerance(value: Optional[float]) -> Optional[float]:
    """--rtol/--atol: NaN or infinity would make every comparison pass or fail: a usage error."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


RtolOpt = typer.Option(None, "--rtol", metavar="X", help="Relative tolerance, scaled by the output's magnitude "
                                            "[default: 1e-4 for float32, 2e-2 for float16].", min=0.0,
                       callback=_finite_tolerance)
AtolOpt = typer.Option(None, "--atol", metavar="X", help="Absolute tolerance added to rtol * max|output| [default: 1e-6 for float32].",
                       min=0.0, callback=_finite_tolerance)
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; negative seeds are not reproducible across versions
SeedOpt = typer.Option(0, "--seed", metavar="N", help="Seed of the random verification inputs (0 to 2**63-1).",
                       min=0, max=SEED_MAX)
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
                         "(torch.export), onnx (needs the onnx extra; checked in onnxruntime) or hf (a transformers "
                         "save_pretrained folder, for transformers models).")

DynamicShapesOpt = typer.Option("auto", "--dynamic-shapes", metavar="MODE", help="Dynamic input dims of pt2 and ONNX files: auto "
                                "(batch and height/width where the model allows, else batch, else static), batch, "
                                "or none (static); the report lists them (export_dynamic_dims).")
LinearAsConvOpt = typer.Option(False, "--linear-as-conv", help="Also turn nn.Linear layers into equivalent pointwise "
                                                               "(1x1) conv modules (paradigm 9).")
NoGraphOpt = typer.Option(False, "--no-graph", help="Convert only blocks with a recipe or a native method; do not "
                                                    "fold the other linear regions (conv+BN, branch sums, ...).")
LayoutOpt = typer.Option("default", "--layout", metavar="LAYOUT", help="Deploy layout: default (recipes, native "
                         "methods, then the graph pass wherever a fold gains something) or reference (the papers' "
                         "deploy models key for key: recipes and native methods only, as --no-graph). Recorded in "
                         "the deploy file; the report says when the default differs from the reference.")
AllowNonfiniteOpt = typer.Option(False, "--allow-nonfinite", help="Convert a checkpoint holding NaN or infinite "
                                 "values (by default an error naming the first such tensor, --no-verify too).")
StrictOpt = typer.Option(False, "--strict", help="Fail (exit 1, nothing written) when anything foldable is left: "
                                                 "BatchNorms, untraceable modules, unfoldable regions.")


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} x{v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return "; ".join(str(v) for v in value) or "-"
    return str(value)


def summary_table(title: str, report: dict, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table

    ok = report.get("ok", True)
    table = Table(title=f"{title}: [{'green' if ok else 'red'}]{'OK' if ok else 'FAILED'}[/]", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, key in rows:
        if key in report and report[key] is not None and report[key] != []:
            table.add_row(label, fmt_value(report[key]))
    worst = report.get("worst_block")
    if worst:
        err = worst["max_rel_err"]  # None when NaN/Inf (strict JSON): say which
        shown = f"{err:.3g}" if err is not None else report.get("nonfinite_values", {}).get("worst_block.max_rel_err", "-")
        table.add_row("worst block", f"{worst['path']} ({worst['type']}): {shown}")
    if report.get("failed_blocks"):
        table.add_row("failed blocks", ", ".join(report["failed_blocks"][:5]))
    stderr_console().print(table)


CONVERT_ROWS = [
    ("input", "input"), ("output", "output"), ("spec", "spec"), ("format", "format"), ("dtype", "dtype"),
    ("blocks", "blocks"), ("graph regions", "graph_regions"), ("completeness", "completeness"), ("layout", "layout"),
    ("reference layout", "reference_layout"),
    ("params before", "params_before"), ("params after", "params_after"),
    ("params, reference layout", "params_reference"), ("FLOPs before", "flops_before"), ("FLOPs after", "flops_after"),
    ("max abs err", "max_abs_err"), ("max rel err", "max_rel_err"), ("cosine", "cosine"),
    ("training-model rel err (float floor)", "train_rel_err"), ("tolerance rtol/atol", "tolerance"),
    ("checkpoint dtype", "checkpoint_dtype"), ("native blocks", "native_blocks"),
    ("exported file checked in", "export_runtime"), ("exported vs deploy rel err", "export_max_rel_err"),
    ("dynamic dims", "export_dynamic_dims"), ("computed in", "compute_dtype"),
    ("fused weights' rounding (rel)", "weight_rounding_rel_err"), ("non-finite", "nonfinite"),
    ("plot", "plot"), ("notes", "notes"),
]


def guarded(action: Callable[[], Any], as_json: bool, about: Any = None) -> Any:
    """Run `action`, mapping user errors to exit 2 with one line on stderr: never a traceback (unless
    REPARAM_DEBUG is set). Every command goes through here.

    Meanwhile stdout is stderr (a spec's prints never reach the JSON report or the deploy file),
    torch's compiler cache is a private folder removed afterwards (`safeio.private_compiler_cache`),
    and a spec or library calling sys.exit() is an error like any other, not a silent exit.
    `about` (the input file) is named by an OSError that names no file (a read that fails with EIO).
    """
    import contextlib

    from reparam_cli.errors import ReparamError

    from reparam_cli.io.safeio import private_compiler_cache

    try:
        with contextlib.redirect_stdout(sys.stderr), private_compiler_cache():
            return action()
    except ReparamError as exc:
        fail(str(exc), as_json)
    except (KeyboardInterrupt, Interrupted) as exc:
        interrupted(exc, as_json)
    except typer.Exit:
        raise
    except SystemExit as exc:
        fail(f"code run for the spec called sys.exit({exc.code!r})", as_json)
    except Exception as exc:
        from reparam_cli.io.signals import received

        if received() is not None:  # a signal came first (and was swallowed, e.g. inside an import)
            interrupted(received(), as_json)
        if isinstance(exc, BrokenPipeError) or getattr(exc, "errno", None) == errno.EPIPE:
            raise  # a closed pipe: the app exits 141, silently, as any Unix tool
        if isinstance(exc, OSError) and exc.filename is None and about is not None and str(about) != "-":
            exc.filename = str(about)
        known = classified(exc)
        if known is not None:
            fail(known, as_json)
        debug = bool(os.environ.get("REPARAM_DEBUG"))
        if debug:  # the traceback, then the same error line and exit code as without it
            import traceback

            traceback.print_exc(file=sys.stderr)
        fail(f"unexpected {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
             + ("" if debug else " (set REPARAM_DEBUG=1 for a traceback)"), as_json)


def classified(exc: BaseException) -> str | None:
    """The sentence for an exception that is not reparam's own but is not a bug either: a file
    operation the operating system refused (a read-only folder, a file that cannot be read), memory
    running out, input nested beyond Python's recursion limit. None for anything else."""
    from reparam_cli.io.safeio import os_error_sentence

    if isinstance(exc, OSError):
        return os_error_sentence(exc)
    if isinstance(exc, MemoryError):
        return "out of memory" + (f": {one_line(exc)}" if str(exc).strip() else "")
    if isinstance(exc, RecursionError):
        return "the input nests too deeply to be processed (Python's recursion limit)"
    return None


def run_action(action: Callable[[Callable[[str], None]], dict], as_json: bool, title: str, rows=(),
               show: Callable[[dict], None] | None = None, about: Any = None) -> None:
    """Run a pipeline action, print its report (the summary table of `rows`, or `show(report)`), map
    errors to exit codes."""
    from reparam_cli.errors import VerificationFailed

    console = stderr_console()
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
        report, code = guarded(attempt, as_json, about)
    finally:
        if status is not None:
            status.stop()
    if "rtol" in report:
        report["tolerance"] = f"{report['rtol']:.3g} / {report['atol']:.3g}"
    if as_json:
        report.pop("tolerance", None)
        echo_json(report)
    elif show is not None:
        show(report)
    else:
        summary_table(title, report, rows)
    raise typer.Exit(code)


def echo_json(report: Any) -> None:
    """The one JSON object of --json on stdout: strict JSON (no NaN/Infinity tokens, see jsonio)."""
    from reparam_cli.core.jsonio import dumps

    typer.echo(dumps(report))


def interrupted(exc: BaseException, as_json: bool = False) -> None:
    """A signal stopped the command (cleanup has run): one line, exit 128 + the signal (130 for Ctrl-C)."""
    import signal

    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    message = f"interrupted by {signal.Signals(signum).name} (no partial output is left behind)"
    typer.echo(f"error: {message}", err=True)
    if as_json:
        echo_json({"ok": False, "error": message})
    raise typer.Exit(128 + signum)


def fail(message: str, as_json: bool) -> None:
    message = one_line(message)
    typer.echo(f"error: {message}", err=True)
    if as_json:
        echo_json({"ok": False, "error": message})
    raise typer.Exit(EXIT_BAD_INPUT)


def precheck(as_json: bool, spec: Optional[str] = None, inputs: tuple = (), extras: tuple = (),
              folder: Optional[Path] = None) -> None:
    """Torch-free checks before any work, so bad input is answered in a fraction of a second: the spec
    reference (unknown names get suggestions), that each input file (or the input folder) exists, and
    each needed (extra, feature)."""

    def check() -> None:
        from reparam_cli.errors import CheckpointError, ReparamError
        from reparam_cli.extras import require_extra
        from reparam_cli.pipeline.specs import check_spec_ref

        if spec is not None:
            check_spec_ref(spec)
        for path in inputs:
            if str(path) != "-" and not Path(path).exists():
                raise CheckpointError(f"checkpoint not found: {path}")
        if folder is not None and not folder.exists():
            raise ReparamError(f"input folder not found: {folder}")
        for extra, feature in extras:
            require_extra(extra, feature)

    guarded(check, as_json)


def verify_options(samples: int, seed: int, rtol, atol, input_shape):
    from reparam_cli.pipeline.options import VerifyOptions
    from reparam_cli.core.spec import parse_shape

    return VerifyOptions(samples=samples, seed=seed, rtol=rtol, atol=atol,
                         input_shape=parse_shape(input_shape) if input_shape else None)


def refuse_json_on_stdout(output: Optional[Path], as_json: bool) -> None:
    """With `-o -`, stdout carries the deploy file: a JSON report there would corrupt it."""
    if as_json and output is not None and str(output) == "-":
        fail("--json cannot be combined with -o - (stdout carries the deploy file)", as_json=False)
