"""The KV pool memory: created once by the daemon, mapped zero-copy by every worker.

Two kinds behind one interface:

- ``shm`` (CPU, tests, CI): a file under /dev/shm holding the pool in the KVLayout order
  (``[layers, pages, 2, page_size, kv_heads, head_dim]``, C-contiguous). Workers map it with
  ``torch.from_file(shared=True)``, so a write in one process is visible in every other.
- ``cuda_ipc`` (GPU): one plain cudaMalloc through ``cupy.cuda.Memory`` (never torch's caching
  allocator: its blocks sit at offsets inside larger segments and the receiver would map the segment
  base), exported with ``cudaIpcGetMemHandle`` and opened in workers with ``cudaIpcOpenMemHandle``, then
  wrapped as a torch tensor through DLPack without a copy. cupy is imported only on this path.

The daemon calls ``create_pool`` and hands ``descriptor()`` to workers in Welcome; a worker calls
``map_pool(descriptor)``. ``close()`` on the owner removes the file / frees the memory; on a mapping it
unmaps / closes the IPC handle. Close mappings before the owner frees the memory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.kv_layout import DTYPE_SIZES, KVLayout
from shared.protocol import PoolDescriptor

SHM_DIR = Path("/dev/shm")
POOL_KINDS = ("shm", "cuda_ipc")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


if TYPE_CHECKING:
    import torch

# torch is imported only where a pool is mapped (workers): the daemon creates pools without it, which
# keeps its start-up (and so a restart) about 2.5 s shorter.


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a KVLayout dtype name. Raises ValueError for an unknown name."""
    import torch

    if name not in DTYPE_SIZES:
        raise ValueError(f"unknown KV dtype {name!r}; expected one of {sorted(DTYPE_SIZES)}")
    return getattr(torch, name)


def layout_of(desc: PoolDescriptor) -> KVLayout:
    """The KVLayout a descriptor describes (validates its fields)."""
    return KVLayout(
        desc.num_layers, desc.num_pages, desc.page_size, desc.num_kv_heads, desc.head_dim, desc.dtype
    )


def parse_size(text: str) -> int:
    """Parse a byte size such as "512MiB", "2GiB", "1.5GB" or "1048576". Raises ValueError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"not a byte size: {text!r} (examples: 512MiB, 2GiB, 1000000)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    if unit == "B":
        scale = 1
    else:
        power = "KMGT".index(unit[0]) + 1
        scale = (1024 if "I" in unit else 1000) ** power
    value = int(number * scale)
    if value <= 0:
        raise ValueError(f"byte size must be positive: {text!r}")
    return value


def _cuda_index(device: str | int) -> int:
    """Resolve a device given as an index, "cuda:N", "N" or a "GPU-..." UUID to a CUDA ordinal."""
    if isinstance(device, int):
        return device
    text = device.strip()
    if text.startswith("cuda:"):
        text = text[5:]
    if text.isdigit():
        return int(text)
    if text.startswith("GPU-"):
        import cupy

        for index in range(cupy.cuda.runtime.getDeviceCount()):
            if _device_uuid(index) == text:
                return index
        raise ValueError(f"no visible CUDA device has UUID {text}")
    raise ValueError(f"device must be an index, 'cuda:N' or a 'GPU-...' UUID, got {device!r}")


def _device_uuid(index: int) -> str:
    import cupy

    raw = cupy.cuda.runtime.getDeviceProperties(index).get("uuid", b"")
    if not raw:
        return ""
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    h = bytes(raw[:16]).hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class OwnedPool:
    """The daemon's pool. ``close()`` removes the shm file or frees the CUDA allocation; idempotent."""

    def __init__(self, layout: KVLayout, desc: PoolDescriptor, cuda_memory: Any = None) -> None:
        self.layout = layout
        self._desc = desc
        self._cuda_memory = cuda_memory  # keeps the cudaMalloc alive while the daemon runs
        self._closed = False

    def descriptor(self) -> PoolDescriptor:
        return self._desc

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._desc.kind == "shm":
            Path(self._desc.shm_path).unlink(missing_ok=True)
        elif self._cuda_memory is not None:
            import cupy

            with cupy.cuda.Device(self._desc.device_index):
                cupy.cuda.runtime.deviceSynchronize()
            self._cuda_memory = None  # the last reference: cupy calls cudaFree


class MappedPool:
    """A worker's zero-copy view of the pool: ``tensor`` has shape ``layout.shape``."""

    def __init__(
        self, desc: PoolDescriptor, tensor: torch.Tensor, ipc_ptr: int = 0, device_index: int = 0
    ) -> None:
        self.descriptor = desc
        self.layout = layout_of(desc)
        self._tensor: torch.Tensor | None = tensor
        self._ipc_ptr = ipc_ptr
        self._device_index = device_index  # this process's ordinal (may differ from the daemon's)

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            raise ValueError("the pool mapping is closed")
        return self._tensor

    def close(self) -> None:
        """Drop the mapping. The caller must hold no other views of ``tensor``. Idempotent."""
        self._tensor = None
        if self._ipc_ptr:
            import cupy

            with cupy.cuda.Device(self._device_index):
                cupy.cuda.runtime.deviceSynchronize()
                cupy.cuda.runtime.ipcCloseMemHandle(self._ipc_ptr)
            self._ipc_ptr = 0


def daemon_pool_name(uid: int, pid: int) -> str:
    """The pool name a daemon uses: its uid and pid, so a crashed daemon's file can be recognised."""
    return f"{uid}-{pid}"


def remove_stale_daemon_pools(uid: int, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Unlink the shm pools of ``uid``'s daemons whose process is gone (killed with SIGKILL, OOM-killed),
    which could not remove their own file. A pool whose daemon still runs is kept. Pids are compared in
    this process's pid namespace: daemons sharing /dev/shm must share it too (compose: ``pid: host``)."""
    removed = []
    pattern = re.compile(rf"radixkv-{uid}-(\d+)\.kv")
    for path in shm_dir.glob(f"radixkv-{uid}-*.kv"):
        found = pattern.fullmatch(path.name)
        if found is None or _pid_alive(int(found.group(1))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def create_pool(
    layout: KVLayout, kind: str, *, name: str, device: str | int = 0, generation: int = 0
) -> OwnedPool:
    """Allocate the pool (zero-filled). ``name`` becomes part of the shm file name (letters, digits,
    ``_.-``). Raises ValueError for a bad kind/name/device, FileExistsError if the shm file exists."""
    if kind not in POOL_KINDS:
        raise ValueError(f"pool kind must be one of {POOL_KINDS}, got {kind!r}")
    if not _NAME_RE.match(name):
        raise ValueError(f"pool name must be 1-100 of [A-Za-z0-9_.-], got {name!r}")
    common: dict[str, Any] = dict(
        num_layers=layout.num_layers,
        num_pages=layout.num_pages,
        page_size=layout.page_size,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=layout.dtype,
        num_bytes=layout.num_bytes,
        generation=generation,
    )
    if kind == "shm":
        path = SHM_DIR / f"radixkv-{name}.kv"
        # O_EXCL: never silently share a file with another daemon; 0600: the KV holds user data.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, layout.num_bytes)  # tmpfs: sparse and zero-filled
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return OwnedPool(layout, PoolDescriptor(kind="shm", shm_path=str(path), **common))

    import cupy

    index = _cuda_index(device)
    with cupy.cuda.Device(index):
        memory = cupy.cuda.Memory(layout.num_bytes)  # one plain cudaMalloc, exportable as a whole
        cupy.cuda.runtime.memset(memory.ptr, 0, layout.num_bytes)
        handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(memory.ptr))
    desc = PoolDescriptor(
        kind="cuda_ipc", ipc_handle=handle, device_index=index, device_uuid=_device_uuid(index), **common
    )
    return OwnedPool(layout, desc, cuda_memory=memory)


def map_pool(desc: PoolDescriptor) -> MappedPool:
    """Map the pool a descriptor names (a worker calls this once per Welcome). Raises ValueError for a
    descriptor that does not describe a usable pool, FileNotFoundError if the shm file is gone."""
    layout = layout_of(desc)
    if desc.num_bytes and desc.num_bytes != layout.num_bytes:
        raise ValueError(f"descriptor says {desc.num_bytes} bytes but its layout needs {layout.num_bytes}")
    import torch

    dtype = torch_dtype(layout.dtype)
    numel = layout.num_bytes // DTYPE_SIZES[layout.dtype]
    if desc.kind == "shm":
        path = Path(desc.shm_path)
        if path.parent != SHM_DIR:
            raise ValueError(f"shm pool must live under {SHM_DIR}, got {desc.shm_path!r}")
        size = path.stat().st_size
        if size != layout.num_bytes:
            raise ValueError(f"{path} holds {size} bytes, the layout needs {layout.num_bytes}")
        flat = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
        return MappedPool(desc, flat.view(layout.shape))
    if desc.kind != "cuda_ipc":
        raise ValueError(f"unknown pool kind {desc.kind!r}")
    if len(desc.ipc_handle) != 64:
        raise ValueError(f"cuda_ipc handle must be 64 bytes, got {len(desc.ipc_handle)}")

    import cupy

    index = _cuda_index(desc.device_uuid) if desc.device_uuid else desc.device_index
    with cupy.cuda.Device(index):
        ptr = cupy.cuda.runtime.ipcOpenMemHandle(
            desc.ipc_handle, cupy.cuda.runtime.cudaIpcMemLazyEnablePeerAccess
        )
        try:
            memory = cupy.cuda.UnownedMemory(ptr, layout.num_bytes, None, index)
            raw = cupy.ndarray(
                (layout.num_bytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0)
            )
            # cupy has no bfloat16: share raw bytes through DLPack and reinterpret on the torch side.
            tensor = torch.from_dlpack(raw).view(dtype).view(layout.shape)
        except Exception:
            cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            raise
    assert tensor.numel() == numel
    return MappedPool(desc, tensor, ipc_ptr=ptr, device_index=index)
