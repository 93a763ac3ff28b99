"""Turning a library's exception into the one line a user sees, and the decode's own error."""

from __future__ import annotations


class DecodeError(ValueError):
    """Inputs that do not fit the model or each other (the message says what to change)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of `exc`'s message (library errors can run to many lines), or its type name."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
