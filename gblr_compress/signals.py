"""Interrupts: SIGINT and SIGTERM end a run through the same cleanup path as an error.

Python turns SIGINT into :class:`KeyboardInterrupt`; SIGTERM (what ``kill``, ``timeout``
and container runtimes send) ends the process at once by default, so ``finally`` blocks
would not run and a temporary output file could stay behind. :func:`terminate_as_exception`
installs a SIGTERM handler that raises :class:`Terminated` instead, so every ``finally``
(the atomic writes of :mod:`gblr_compress.files`, temporary folders) runs exactly as it
does on an error. Both derive from :class:`BaseException`, so the product's
``except Exception`` handlers (which turn a failing user model into a one-line error)
never swallow them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["SIGINT_EXIT", "SIGTERM_EXIT", "Terminated", "exit_code", "interrupt_in", "terminate_as_exception"]

SIGINT_EXIT = 128 + signal.SIGINT  # 130: the shell's convention for a process killed by SIGINT
SIGTERM_EXIT = 128 + signal.SIGTERM  # 143


class Terminated(BaseException):
    """The process received SIGTERM."""


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(f"received signal {signum}")


@contextmanager
def terminate_as_exception() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (the previous handler is
    restored afterwards). Outside the main thread signals cannot be handled; the block
    then runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(exc: BaseException) -> int | None:
    """The exit code of an interrupt (130 for SIGINT, 143 for SIGTERM); None otherwise."""
    if isinstance(exc, KeyboardInterrupt):
        return SIGINT_EXIT
    if isinstance(exc, Terminated):
        return SIGTERM_EXIT
    return None



def interrupt_in(exc: BaseException) -> BaseException | None:
    """The interrupt behind ``exc``, if one is in its cause / context chain.

    An interrupt that lands inside an import of a compiled extension comes back as an
    ``ImportError("initialization failed")`` whose cause is the interrupt (pybind11
    wraps whatever the module's init raised); it is still an interrupt.
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if exit_code(link) is not None:
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None
