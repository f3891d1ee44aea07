"""Process bodies for the CUDA IPC pool tests (a module of their own: spawned children import them)."""

from __future__ import annotations

import multiprocessing.synchronize
from multiprocessing.connection import Connection

import msgspec
import torch

from shared.kv_layout import KVLayout
from shared.pool import create_pool, map_pool
from shared.protocol import PoolDescriptor

TIMEOUT_S = 120


def own_pool(layout: KVLayout, conn: Connection, done: multiprocessing.synchronize.Barrier) -> None:
    """The daemon's side: create the pool, publish its descriptor, and once every mapping is closed,
    free it and report how much device memory came back."""
    import cupy

    pool = create_pool(layout, "cuda_ipc", name="gpu-test", device=0)
    conn.send_bytes(msgspec.msgpack.encode(pool.descriptor()))
    done.wait(TIMEOUT_S)  # every mapper has closed its handle
    free_before, _ = cupy.cuda.runtime.memGetInfo()
    pool.close()
    free_after, _ = cupy.cuda.runtime.memGetInfo()
    conn.send((free_after - free_before, pool.closed))


def map_and_write(
    desc_bytes: bytes,
    page: int,
    value: float,
    written: multiprocessing.synchronize.Barrier,
    closed: multiprocessing.synchronize.Barrier,
    conn: Connection,
) -> None:
    """A worker's side: map the pool, fill `page` (every layer, K and V) with `value`, wait until every
    mapper has written, then report the page sums it sees and close the handle."""
    desc = msgspec.msgpack.decode(desc_bytes, type=PoolDescriptor)
    mapped = map_pool(desc)
    pool = mapped.tensor
    pool[:, page].fill_(value)
    torch.cuda.synchronize()
    written.wait(TIMEOUT_S)
    sums = pool.float().sum(dim=(0, 2, 3, 4, 5)).tolist()
    del pool
    mapped.close()
    try:
        mapped.tensor  # noqa: B018 -- must raise once closed
        still_open = True
    except ValueError:
        still_open = False
    conn.send((sums, still_open))
    closed.wait(TIMEOUT_S)
