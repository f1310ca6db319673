"""Pipes: `-` as the checkpoint (stdin) and as the output (stdout), for `reparam convert` and `inspect`.

A piped checkpoint is spooled to an unnamed temporary file (O_TMPFILE in $TMPDIR, read through
/proc/self/fd/N; its format told from its bytes); a stdout output is written unnamed too and copied
out only once converted and verified (`safeio.HeldOutput`). Neither ever has a name, so no signal,
not even SIGKILL, leaves it behind. While converting, stdout is redirected to stderr so that no stray
print corrupts the binary stream.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from reparam_cli.core.spec import ModelSpec
from reparam_cli.errors import CheckpointError, OutputError, ReparamError, VerificationFailed
from reparam_cli.io.formats import FOLDER_FORMATS, SUFFIX
from reparam_cli.io.safeio import HeldOutput
from reparam_cli.io.sniff import sniff_format
from reparam_cli.pipeline.conversion import convert_checkpoint
from reparam_cli.pipeline.options import ConvertOptions, Progress, no_progress

STDIO = "-"


def is_stdio(path: str | Path | None) -> bool:
    """True for the `-` that stands for stdin (as a checkpoint) or stdout (as an output)."""
    return path is not None and str(path) == STDIO


def _stdin_head(stdin=None):
    """(stream, its first 16 bytes, their format): refuses a terminal and what is not a checkpoint."""

    if stdin is None and (sys.stdin is None or getattr(sys.stdin, "closed", False)):
        raise CheckpointError("stdin is closed: no checkpoint to read", hint="pipe one in, e.g. `< model.pth`")
    stream = stdin if stdin is not None else sys.stdin.buffer
    if stdin is None and sys.stdin.isatty():
        raise CheckpointError("no checkpoint on stdin", hint="pipe one in, e.g. `< model.pth`")
    head = stream.read(16)
    while len(head) < 16:  # a pipe may deliver fewer bytes than asked for
        more = stream.read(16 - len(head))
        if not more:
            break
        head += more
    return stream, head, sniff_format(head)


def spool_stdin(folder: Path, stdin=None) -> Path:
    """Copy a checkpoint piped to stdin into `folder` (streamed, not held in memory) and return its
    path, named `stdin.safetensors` or `stdin.pth` after its content so the usual readers apply."""
    stream, head, kind = _stdin_head(stdin)
    path = folder / f"stdin{'.safetensors' if kind == 'safetensors' else '.pth'}"
    with open(path, "wb") as f:
        f.write(head)
        shutil.copyfileobj(stream, f, 1 << 20)
    return path


@contextlib.contextmanager
def spooled_stdin(stdin=None) -> Iterator[Path]:
    """The checkpoint piped to stdin as a readable path that has no name in any folder: an unnamed
    temporary file (O_TMPFILE, or created and unlinked at once) read as /proc/self/fd/N. Where /proc
    is missing, a temporary folder instead (removed at the end, or by the OS's tmp cleaning)."""
    stream, head, _ = _stdin_head(stdin)
    with tempfile.TemporaryFile(prefix="reparam-stdin-") as f:
        path = Path(f"/proc/self/fd/{f.fileno()}")
        if os.path.exists(path):
            f.write(head)
            shutil.copyfileobj(stream, f, 1 << 20)
            f.flush()
            yield path
            return
    with tempfile.TemporaryDirectory(prefix="reparam-stdin-") as tmp:
        path = Path(tmp) / "stdin"
        with open(path, "wb") as f:
            f.write(head)
            shutil.copyfileobj(stream, f, 1 << 20)
        yield path


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout meanwhile (print, logging, C extensions) to stderr, so that
    stdout carries nothing but the binary output written after the block."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
        err = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. a test runner's buffer)
        fd = None
    saved = None
    if fd is not None:
        saved = os.dup(fd)
        os.dup2(err, fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        if saved is not None:
            os.dup2(saved, fd)
            os.close(saved)


def convert_stdio(
    checkpoint: str | Path,
    spec: ModelSpec | str,
    output: str | Path | None = None,
    options: ConvertOptions | None = None,
    *,
    stdin=None,
    stdout=None,
    progress: Progress = no_progress,
    **changes,
) -> dict:
    """`convert_checkpoint` where the checkpoint and/or the output may be `-` (stdin / stdout).

    The piped checkpoint is spooled to a temporary folder (its format told from its content); a
    stdout output is written there first and copied to stdout only once converted and verified, so a
    failed verification writes nothing. While converting, stdout is redirected to stderr so no stray
    print can corrupt the binary output. `options` and `changes` are those of `convert_checkpoint`.
    """
    options = ConvertOptions.of(options, **changes)
    if not (is_stdio(checkpoint) or is_stdio(output)):
        return convert_checkpoint(checkpoint, spec, output, options, progress=progress)
    if output is None:
        raise OutputError("a checkpoint read from stdin has no folder to write beside",
                          hint="pass -o FILE, or -o - for stdout")
    if is_stdio(output) and options.fmt in FOLDER_FORMATS:
        raise OutputError(f"-f {options.fmt} writes a folder, which cannot go to stdout", hint="pass -o FOLDER")
    if is_stdio(output):
        sink = stdout if stdout is not None else sys.stdout.buffer
        if getattr(sink, "isatty", lambda: False)():
            raise OutputError("refusing to write a binary file to the terminal",
                              hint="redirect stdout, e.g. `> model.safetensors`")
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(spooled_stdin(stdin)) if is_stdio(checkpoint) else Path(checkpoint)
        held = stack.enter_context(HeldOutput(SUFFIX[options.fmt])) if is_stdio(output) else None
        target = held.path if held is not None else Path(output)
        names = {str(source): "<stdin>"} if is_stdio(checkpoint) else {}
        if held is not None:
            names[str(target)] = "<stdout>"
        try:
            with stdout_to_stderr():
                report = convert_checkpoint(source, spec, target, options, progress=progress,
                                            source_name="<stdin>" if is_stdio(checkpoint) else None)
        except VerificationFailed as exc:
            exc.report.update(_stdio_names(checkpoint, output))
            raise
        except ReparamError as exc:  # name the pipe, not the temporary file behind it
            for tmp_name, shown in names.items():
                exc.message = exc.message.replace(tmp_name, shown)
            raise
        if held is not None:
            held.copy_to(sink)
    report.update(_stdio_names(checkpoint, output))
    return report


def _stdio_names(checkpoint: str | Path, output: str | Path) -> dict[str, str]:
    return {"input": "<stdin>" if is_stdio(checkpoint) else str(checkpoint),
            "output": "<stdout>" if is_stdio(output) else str(output)}


