"""Pipes: `-` as the checkpoint (stdin) and as the output (stdout), for `reparam convert` and `inspect`.

A piped checkpoint is spooled to a temporary file (its format told from its bytes); a stdout output
is written to a temporary file first and copied out only once converted and verified. While
converting, stdout is redirected to stderr so that no stray print corrupts the binary stream.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .checkpoint import is_safetensors_head
from .errors import OutputError, ReparamError, VerificationFailed
from .export import SUFFIX
from .pipeline import convert_checkpoint
from .spec import ModelSpec

STDIO = "-"


def is_stdio(path: str | Path | None) -> bool:
    """True for the `-` that stands for stdin (as a checkpoint) or stdout (as an output)."""
    return path is not None and str(path) == STDIO


def sniff_format(head: bytes) -> str:
    """'safetensors' or 'torch', from a file's first bytes (at least 9 of them for safetensors).

    safetensors: an 8-byte little-endian header length, then the JSON header ('{'). torch: a zip
    archive ('PK', torch >= 1.6) or a legacy pickle (protocol byte 0x80). Raises CheckpointError.
    """
    if is_safetensors_head(head):
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    from .errors import CheckpointError

    raise CheckpointError("the input is neither a safetensors file nor a torch checkpoint"
                          if head else "the input is empty")


def spool_stdin(folder: Path, stdin=None) -> Path:
    """Copy a checkpoint piped to stdin into `folder` (streamed, not held in memory) and return its
    path, named `stdin.safetensors` or `stdin.pth` after its content so the usual readers apply."""
    import shutil

    from .errors import CheckpointError

    stream = stdin if stdin is not None else sys.stdin.buffer
    if stdin is None and sys.stdin.isatty():
        raise CheckpointError("no checkpoint on stdin", hint="pipe one in, e.g. `< model.pth`")
    head = stream.read(16)
    while len(head) < 16:  # a pipe may deliver fewer bytes than asked for
        more = stream.read(16 - len(head))
        if not more:
            break
        head += more
    path = folder / f"stdin{'.safetensors' if sniff_format(head) == 'safetensors' else '.pth'}"
    with open(path, "wb") as f:
        f.write(head)
        shutil.copyfileobj(stream, f, 1 << 20)
    return path


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
    *,
    stdin=None,
    stdout=None,
    **options,
) -> dict:
    """`convert_checkpoint` where the checkpoint and/or the output may be `-` (stdin / stdout).

    The piped checkpoint is spooled to a temporary folder (its format told from its content); a
    stdout output is written there first and copied to stdout only once converted and verified, so a
    failed verification writes nothing. While converting, stdout is redirected to stderr so no stray
    print can corrupt the binary output. `options` are those of `convert_checkpoint`.
    """
    if not (is_stdio(checkpoint) or is_stdio(output)):
        return convert_checkpoint(checkpoint, spec, output, **options)
    if output is None:
        raise OutputError("a checkpoint read from stdin has no folder to write beside",
                          hint="pass -o FILE, or -o - for stdout")
    if is_stdio(output):
        sink = stdout if stdout is not None else sys.stdout.buffer
        if getattr(sink, "isatty", lambda: False)():
            raise OutputError("refusing to write a binary file to the terminal",
                              hint="redirect stdout, e.g. `> model.safetensors`")
    with tempfile.TemporaryDirectory(prefix="reparam-") as tmp:
        folder = Path(tmp)
        source = spool_stdin(folder, stdin) if is_stdio(checkpoint) else Path(checkpoint)
        fmt = options.get("fmt", "safetensors")
        target = folder / f"stdout{SUFFIX.get(fmt, '.out')}" if is_stdio(output) else Path(output)
        names = {str(source): "<stdin>"} if is_stdio(checkpoint) else {}
        if is_stdio(output):
            names[str(target)] = "<stdout>"
        try:
            with stdout_to_stderr():
                report = convert_checkpoint(source, spec, target, **options)
        except VerificationFailed as exc:
            exc.report.update(_stdio_names(checkpoint, output))
            raise
        except ReparamError as exc:  # name the pipe, not the temporary file behind it
            for tmp_name, shown in names.items():
                exc.message = exc.message.replace(tmp_name, shown)
            raise
        if is_stdio(output):
            with open(target, "rb") as f:
                shutil.copyfileobj(f, sink, 1 << 20)
            sink.flush()
    report.update(_stdio_names(checkpoint, output))
    return report


def _stdio_names(checkpoint: str | Path, output: str | Path) -> dict[str, str]:
    return {"input": "<stdin>" if is_stdio(checkpoint) else str(checkpoint),
            "output": "<stdout>" if is_stdio(output) else str(output)}


