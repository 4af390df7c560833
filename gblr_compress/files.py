"""Writing output files atomically: a reader never sees half a file.

Every file the product writes (the ONNX model, its external weights, the report) goes
to a temporary name in the destination folder first and is renamed into place with
``os.replace`` (atomic on one filesystem). A failure or an interrupt before the rename
leaves nothing behind under the final name, and the temporary file is removed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` when the block succeeds.

    Example:
        >>> with atomic_path("out/model.onnx") as tmp:
        ...     onnx.save_model(proto, str(tmp))
    """
    path = Path(path)
    # The temporary file is a dot file in the same folder, so the rename stays on one
    # filesystem (atomic) and a listing of the folder does not show it as a result.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
