"""The one error type a user can cause.

Anything a user can get wrong (a config key, a data row, a model path) raises `TunelabError` with a one-line message
that says where (file:line or config key), what is wrong and what to do. The CLI prints it and exits with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """A problem with the user's input, reported as one line; the CLI exits with code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def where(file: str | None, line: int | None = None) -> str:
    """Format a location prefix such as ``data/train.jsonl:12: `` (empty when nothing is known)."""
    if not file:
        return ""
    return f"{file}:{line}: " if line is not None else f"{file}: "
