"""Small pieces every benchmark script shares: one-thread LAPACK, and the entry point."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch

from gblr_compress.errors import InputError
from gblr_compress.signals import SIGTERM_EXIT, Terminated, terminate_as_exception

__all__ = ["run_main", "single_thread"]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run LAPACK on one thread: on the 2-core box, multi-threaded float64 SVD of a
    (1536, 384) matrix took ~5 s (thread thrashing) versus 0.2 s on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_main(main: Callable[[], int]) -> None:
    """A benchmark script's ``__main__``: its exit code, or one line and exit 2 on bad input.

    SIGTERM (``timeout``, ``kill``) unwinds as an exception, so ``subprocess.run`` kills
    the command it is running: by default the script died at once and the
    ``gblr-compress`` child ran on beside whatever came next (an MPNet init took 718 s
    instead of 265 s next to one). One line and exit 143 then.
    """
    try:
        with terminate_as_exception():
            sys.exit(main())
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("interrupted (SIGTERM)", file=sys.stderr)
        sys.exit(SIGTERM_EXIT)
