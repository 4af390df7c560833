"""The exception types for bad user input.

Library code raises :class:`InputError` for anything the user can fix (a missing file,
a budget out of range, calibration data that does not fit the model). The CLI catches
it once and turns it into a one-line message with exit code 2; any other exception is
an internal error (exit code 1). A run whose result falls short of what was asked
(the ONNX model does not match PyTorch, or the fidelity gate fails) raises
:class:`FidelityError`: exit code 3, nothing written. A configuration field out of range raises
:class:`ConfigError`, which names the field, so the CLI can name the flag instead
(library messages never name command-line flags).
"""

from __future__ import annotations

__all__ = ["ConfigError", "FidelityError", "InputError"]


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


class FidelityError(RuntimeError):
    """The compressed model is not good enough to write: its ONNX graph does not match
    PyTorch, or its held-out agreement with the dense model is below the asked minimum.
    The message is one line with the figures; the CLI exits 3 and writes nothing.

    Attributes:
        forceable: the user may write the result anyway (the fidelity gate's ``force``).
    """

    def __init__(self, message: str, forceable: bool = False) -> None:
        super().__init__(message)
        self.forceable = forceable
