"""Errors a user can cause. The CLI turns `ReparamError` into exit code 2 with one line on stderr,
and `VerificationFailed` into exit code 1."""

from __future__ import annotations





class ReparamError(Exception):
    """Bad input or an impossible request: one clear sentence, optionally with a hint."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class NotEquivalent(ReparamError):
    """The requested fusion has no exactly equivalent single layer (geometry does not line up)."""


class SpecError(ReparamError):
    """A model spec could not be found, parsed or built."""


class CheckpointError(ReparamError):
    """A checkpoint could not be read, or does not fit the model built from the spec."""


class OutputError(ReparamError):
    """The output could not be written where it was asked for."""


class VerificationFailed(Exception):
    """The deploy model does not compute the same function as the training model."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class Incomplete(VerificationFailed):
    """--strict: the conversion left something foldable or unfused (exit code 1, nothing written)."""
