"""Messages: one-line texts for errors and reports, and quieting a library's logger.

Torch-free. Every error reparam shows a user is one line, so exceptions from other code (a
library, a user's spec) are cut to their first line here, in one place.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


def first_line(text: object) -> str:
    """The first non-blank line of `text` (an exception or any object's str), stripped; '' if none."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def one_line(text: object) -> str:
    """All non-blank lines of `text` joined with '; ' (a message that must fit on one line)."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe(exc: BaseException) -> str:
    """'TypeName: first line of the message' (just the type's name when the message is empty)."""
    text = first_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Only errors from the logger `name` while this runs (a library's chatter stays off the output)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
