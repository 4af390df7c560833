"""Read the ``metadata_props`` of an ONNX file without loading its weights.

Reports and structure records travel inside the exported file as metadata
(``gblr.report``, ``gblr.structure``, ``gblr.export``); readers such as
``gblr-compress inspect`` only need those strings, so external weight data is never
loaded.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from gblr_compress.errors import InputError

__all__ = ["read_metadata"]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a ``{key: value}`` dict.

    Args:
        path: an ``.onnx`` file (external data, if any, is not read).

    Returns:
        Every metadata key and value; later duplicates win.

    Raises:
        InputError: the file is missing or is not an ONNX model.

    Example:
        >>> json.loads(read_metadata("model.onnx")["gblr.report"])["version"]
        1
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-ish errors, ...
        raise InputError(f"not an ONNX model: {path} ({type(exc).__name__})") from None
    # Random bytes sometimes decode as an (empty) protobuf; a model has a graph.
    if not proto.HasField("graph"):
        raise InputError(f"not an ONNX model: {path} (no graph)")
    return {p.key: p.value for p in proto.metadata_props}
