"""SIGINT, SIGTERM and SIGHUP as an exception, so every command cleans up the same way.

A job scheduler stops jobs with SIGTERM, a closed terminal sends SIGHUP, Ctrl-C sends SIGINT: each
raises `Interrupted` in the main thread, so `finally` blocks run (unnamed outputs are dropped, named
temporaries removed, the batch manifest closed) and the CLI exits with 128 + the signal number
(130, 143, 129) and one line on stderr. `Interrupted` derives from BaseException, like
KeyboardInterrupt: `except Exception` does not swallow it. Further signals are ignored while the
process cleans up, so a second Ctrl-C cannot cut the cleanup short (SIGKILL still can; outputs are
written so that even it leaves nothing behind, see `safeio.py`); should the exception be swallowed
somewhere, a timer ends the process after CLEANUP_SECONDS with the same exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

from reparam_cli.io.safeio import remove_live_temps

HANDLED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(BaseException):
    """The process received SIGINT, SIGTERM or SIGHUP."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        return f"interrupted by {self.name}"


CLEANUP_SECONDS = 10.0  # how long the cleanup may take before the process is ended anyway


RECEIVED: list[int] = []  # the signal that raised Interrupted, once one has


def received() -> "Interrupted | None":
    """The interruption that already happened, if any: an error that follows it (an import cut in half
    that fails again: "cannot load module more than once per process") is that interruption."""
    return Interrupted(RECEIVED[0]) if RECEIVED else None


def _raise(signum: int, frame) -> None:
    RECEIVED.append(signum)
    for sig in HANDLED:  # no second interruption in the middle of the cleanup
        signal.signal(sig, signal.SIG_IGN)
    # The exception may land where it is swallowed (a __del__, a library's bare `except:`): then the
    # process would go on with signals ignored. A timer ends it regardless once cleanup had its time.
    timer = threading.Timer(CLEANUP_SECONDS, _force_exit, (signum,))
    timer.daemon = True
    timer.start()
    raise Interrupted(signum)


def _force_exit(signum: int) -> None:
    remove_live_temps()  # unnamed outputs need nothing: the kernel frees them with the process
    with contextlib.suppress(Exception):
        os.write(2, f"error: interrupted by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM/SIGHUP raise Interrupted (main thread only; elsewhere a no-op).
    Signals the process ignores on entry (`nohup`: SIGHUP) stay ignored. The old handlers come back
    when the block ends, unless it ends by Interrupted (the process is on its way out)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    RECEIVED.clear()
    old = {sig: signal.getsignal(sig) for sig in HANDLED}
    for sig, handler in old.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, _raise)
    try:
        yield
    except Interrupted:  # keep ignoring further signals while the caller cleans up and exits
        raise
    except BaseException:
        _restore(old)
        raise
    else:
        _restore(old)


def _restore(old: dict) -> None:
    for sig, handler in old.items():
        with contextlib.suppress(TypeError, ValueError):
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
