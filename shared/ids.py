"""Token and page id arrays on the wire: raw little-endian int32 bytes.

A 4k-token Python list costs ~200 us to msgpack-encode; the same ids as raw bytes cost almost nothing,
and numpy reads them back without a copy (`np.frombuffer`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ID_DTYPE = np.dtype("<i4")


def ids_to_bytes(ids: Sequence[int] | np.ndarray) -> bytes:
    """Pack token or page ids into little-endian int32 bytes. Raises ValueError on non-integers."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return b""
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be a flat sequence of integers, got dtype {arr.dtype} shape {arr.shape}")
    if arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max:
        raise ValueError("ids must fit in int32")
    return arr.astype(ID_DTYPE, copy=False).tobytes()


def bytes_to_ids(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Unpack little-endian int32 bytes (read-only view, no copy). Raises ValueError on a ragged length."""
    if len(data) % ID_DTYPE.itemsize:
        raise ValueError(f"id array of {len(data)} bytes is not a multiple of {ID_DTYPE.itemsize}")
    return np.frombuffer(data, dtype=ID_DTYPE)
