"""The exception types for bad user input.

Library code raises :class:`InputError` for anything the user can fix (a missing file,
a budget out of range, calibration data that does not fit the model). The CLI catches
it once and turns it into a one-line message with exit code 2; any other exception is
an internal error (exit code 1). A configuration field out of range raises
:class:`ConfigError`, which names the field, so the CLI can name the flag instead
(library messages never name command-line flags).
"""

from __future__ import annotations

__all__ = ["ConfigError", "InputError"]


class InputError(ValueError):
    """Bad input from the user: the message is one line that names the problem."""


class ConfigError(InputError):
    """A configuration field with a bad value: ``"<field> <problem>"``.

    Attributes:
        field: the dataclass field, e.g. ``"budget"`` or ``"steps"``.
        problem: what is wrong, e.g. ``"must be in (0, 1], got 2.0"``.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem
