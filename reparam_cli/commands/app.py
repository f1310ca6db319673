"""The `reparam` command line: one Typer app that registers the commands (one file each in this
folder, plain functions), maps usage errors to one line and exit 2, and guards stdout.

A new command is a file here with a function and its SHORT_HELP, added to COMMANDS below; what a
command shares with the others (options, error handling, tables) is in `common.py`. Nothing here
imports torch: `reparam --help`, `--version` and usage errors answer at once.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import os
import sys

import typer
from typer.core import TyperGroup

from reparam_cli._version import __version__
from reparam_cli.commands import batch, convert, init, inspect, quantize, specs, verify
from reparam_cli.commands.common import EXIT_BAD_INPUT, EXIT_OK, classified
from reparam_cli.core.machine import share_the_machine
from reparam_cli.core.messages import one_line
from reparam_cli.io.signals import Interrupted, interrupts_as_exceptions

# click's exceptions, wherever this Typer takes click from (recent Typers vendor their own copy)
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
            typer.echo(f"error: {one_line(exc.format_message())}{where}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except _click.ClickException as exc:
            typer.echo(f"error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except SystemExit:
            raise
        except Interrupted as exc:  # a signal outside a command's guard (`reparam specs` starting up)
            _last_line(str(exc), exc.exit_code)
        except KeyboardInterrupt:  # click's Abort, where a click has one, is a RuntimeError: below
            _last_line("interrupted by SIGINT", 130)
        except BaseException as exc:  # noqa: BLE001 - the one error path for whatever escaped a command
            if type(exc).__name__ == "Abort":  # click's Ctrl-C at a prompt (by name: no vendored internals)
                _last_line("interrupted", 130)
            if not isinstance(exc, Exception) or os.environ.get("REPARAM_DEBUG"):
                raise
            from reparam_cli.io.signals import received

            signalled = received()
            if signalled is not None:  # a signal came first: its exit code, whatever error followed
                _last_line(str(signalled), signalled.exit_code)
            _last_line(*unclassified(exc))
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def unclassified(exc: BaseException) -> tuple[str, int]:
    """The one line and exit code for an exception no command handled: a closed or full stdout is
    what any Unix tool says about it; anything else is a bug, reported in one line."""
    if isinstance(exc, BrokenPipeError) or getattr(exc, "errno", None) == errno.EPIPE:
        return "", 141  # 128 + SIGPIPE, silent, as `cmd | head` expects
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EBADF, errno.EIO):
        return f"cannot write to stdout: {exc.strerror or exc}", EXIT_BAD_INPUT
    if isinstance(exc, ValueError) and "closed file" in str(exc):
        return "cannot write to stdout: it is closed", EXIT_BAD_INPUT
    known = classified(exc)
    if known is not None:
        return known, EXIT_BAD_INPUT
    text = one_line(str(exc)) if str(exc).strip() else ""
    return f"unexpected {type(exc).__name__}: {text} (a bug: set REPARAM_DEBUG=1 for a traceback)", EXIT_BAD_INPUT


def _last_line(message: str, code: int) -> None:
    """Write `error: message` on stderr (when there is one, and as far as stderr takes it), exit `code`."""
    if message:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
    sys.exit(code)


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

# Each command's module, in the order `reparam --help` lists them.
COMMANDS = (init, convert, verify, specs, batch, inspect, quantize)
for _module in COMMANDS:
    _name = _module.__name__.rpartition(".")[2]
    app.command(_name, short_help=_module.SHORT_HELP)(getattr(_module, _name))


def version_text() -> str:
    """reparam's version, torch's and the installed extras, without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    from reparam_cli.extras import EXTRAS, missing_modules

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    extras = [name for name in EXTRAS if not missing_modules(name)]
    return f"reparam {__version__} (torch {torch_version}; extras: {', '.join(extras) or 'none'})"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Show the version and exit.", callback=_version_callback,
                                 is_eager=True),
) -> None:
    """Convert, verify and inspect re-parameterizable network checkpoints."""


def _hold_stdout() -> None:
    """Keep the real stdout for reparam's own output only: sys.stdout writes to a private duplicate
    of it, while file descriptor 1 becomes stderr, so whatever else writes there (C extensions,
    subprocesses, a spec writing to fd 1) lands on stderr."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
        real = os.dup(1)
    except OSError:  # started with stdout closed (`>&-`): fd 1 is taken (so no file opened later gets
        with contextlib.suppress(OSError):  # it) and a write to stdout is an error, not lost output
            os.dup2(2, 1)
        sys.stdout = _ClosedStdout()
        return
    except (ValueError, AttributeError):
        return
    try:
        os.dup2(2, 1)
    except OSError:
        os.close(real)
        return
    old = sys.stdout
    sys.stdout = io.TextIOWrapper(open(real, "wb", buffering=1 << 16), encoding=old.encoding, errors=old.errors,
                                  line_buffering=old.line_buffering)


class _ClosedStdout(io.TextIOBase):
    """sys.stdout when the process started without one: writing is an error (EBADF), said once."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "stdout is closed")


def _release_stdout() -> None:
    """After the command: later writes (a spec's atexit handlers, interpreter shutdown) go to stderr."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except (OSError, ValueError):
        pass
    sys.stdout = sys.stderr


def main() -> None:
    """Console-script entry point."""
    # Fusion allocates large float64 buffers; backing them with transparent huge pages cuts the
    # page-fault cost of each allocation 2-3x (read by torch's CPU allocator, so set before import).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    share_the_machine()
    _hold_stdout()
    try:
        # SIGTERM (job schedulers) and SIGHUP (a closed terminal) stop a command as Ctrl-C does:
        # temporaries removed, exit 128 + signal with one line (see signals.py).
        with interrupts_as_exceptions():
            app()
    except BrokenPipeError:  # e.g. `reparam ... --json | head`: silent, 128 + SIGPIPE
        _silence_stdout()
        sys.exit(141)
    except Interrupted as exc:  # a signal outside a command's guard (while starting up)
        with contextlib.suppress(Exception):
            sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    finally:
        _release_stdout()
        _silence_stdout()


def _silence_stdout() -> None:
    """Flush what is left for stdout now; if it cannot go (closed pipe, full disk), point fd 1 at
    /dev/null so the interpreter's own flush at exit prints no second message."""
    try:
        sys.stdout.flush()
        if sys.__stdout__ is not None:
            sys.__stdout__.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)


if __name__ == "__main__":
    main()
