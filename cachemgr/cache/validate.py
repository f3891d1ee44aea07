"""Argument checks shared by the cache's public methods: each raises ValueError and changes nothing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cachemgr.cache.types import Namespace

_I32 = np.iinfo(np.int32)
_LE_I32 = np.dtype("<i4")


def as_int32_ids(values: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    """A flat little-endian int32 copy-or-view of ``values``; ValueError on non-integers or out of range."""
    if isinstance(values, np.ndarray):
        arr = values
    else:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"{what} must be a sequence of integers")
        if len(values) == 0:
            return np.empty(0, dtype=_LE_I32)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{what} must be integers")
        arr = np.array(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == _LE_I32:
        return arr
    if arr.size == 0:
        return np.empty(0, dtype=_LE_I32)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    if int(arr.min()) < _I32.min or int(arr.max()) > _I32.max:
        raise ValueError(f"{what} must fit in int32")
    return arr.astype(_LE_I32)


def check_namespace(namespace: object) -> Namespace:
    if not isinstance(namespace, Namespace):
        raise ValueError(f"namespace must be a Namespace, got {type(namespace).__name__}")
    return namespace


def check_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)
