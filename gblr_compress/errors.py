"""The one exception type for bad user input.

Library code raises :class:`InputError` for anything the user can fix (a missing file,
a budget out of range, calibration data that does not fit the model). The CLI catches
it once and turns it into a one-line message with exit code 2; any other exception is
an internal error (exit code 1).
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input from the user: the message is one line that names the problem."""
