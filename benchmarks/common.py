"""Small pieces every benchmark script shares: one-thread LAPACK, and the entry point."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch

from gblr_compress.errors import InputError

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
    """A benchmark script's ``__main__``: its exit code, or one line and exit 2 on bad input."""
    try:
        sys.exit(main())
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
