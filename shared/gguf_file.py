"""A lean GGUF reader: metadata and the tensor index parsed straight from the mmapped file.

Why not `gguf.GGUFReader`: it builds a numpy memmap view per field part, which for a 49k-token vocabulary
takes tens of seconds on a busy CPU, and the daemon, every worker and the tokenizer each open the file.
This parser reads the same bytes with `struct` in well under a second. Tensor payloads stay in the mmap
until asked for; dequantization is gguf's own (`gguf.quants.dequantize`).

File layout (little endian, versions 2 and 3)::

    "GGUF" u32 version | u64 tensor_count | u64 kv_count
    kv_count   x  (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims] innermost first, u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32), then the tensor data; offsets are relative to it
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # row-major (outermost first), as torch/numpy see it
    ggml_type: int
    offset: int  # absolute byte offset in the file
    num_bytes: int


class GGUFFile:
    """An open GGUF file. `fields` holds every metadata value (str, int, float, bool or list); `tensors`
    the tensor index in file order. Call `close()` (or use `with`) to unmap the file; arrays returned by
    `tensor_data` must not be used after that."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self.path.open("rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.fields, self.tensors = self._parse()
        except (struct.error, UnicodeDecodeError, KeyError) as e:
            self._mm.close()
            raise ValueError(f"{self.path}: malformed GGUF file ({e})") from e

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._mm.close()

    def tensor_data(self, tensor: GGUFTensor) -> np.ndarray:
        """float32 array of `tensor.shape` (a fresh array: dequantized or converted from the mmap)."""
        from gguf import GGMLQuantizationType, quants

        raw = np.frombuffer(self._mm, dtype=np.uint8, count=tensor.num_bytes, offset=tensor.offset)
        qtype = GGMLQuantizationType(tensor.ggml_type)
        if qtype == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(tensor.shape).copy()
        if qtype == GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(tensor.shape).astype(np.float32)
        rows = raw.reshape(*tensor.shape[:-1], -1)  # one row of blocks per output row
        return np.asarray(quants.dequantize(rows, qtype), dtype=np.float32).reshape(tensor.shape)

    # ---- parsing ---------------------------------------------------------------------------------------

    def _parse(self) -> tuple[dict[str, Any], list[GGUFTensor]]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        mm = self._mm
        if mm[:4] != b"GGUF":
            raise ValueError(f"{self.path}: not a GGUF file")
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise ValueError(f"{self.path}: unsupported GGUF version {version}")
        self._pos = 24
        fields: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            fields[key] = self._value(vtype)
        infos = []
        for _ in range(num_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            ggml_type, offset = self._unpack("<IQ")
            infos.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
        alignment = int(fields.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        tensors = []
        for name, shape, ggml_type, offset in infos:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            num_bytes = int(np.prod(shape)) // block * block_bytes
            tensors.append(GGUFTensor(name, shape, ggml_type, data_start + offset, num_bytes))
        return fields, tensors

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        s = self._mm[self._pos : self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            elem_type, count = self._unpack("<IQ")
            if elem_type in _NUMPY:  # numeric arrays in one read
                arr = np.frombuffer(self._mm, dtype=_NUMPY[elem_type], count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(elem_type) for _ in range(count)]
        return self._unpack(_SCALAR[vtype])[0]
