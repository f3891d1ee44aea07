"""The CUDA IPC pool: one owner process, the pool mapped in 3 processes at once, zero copy (writes made
after mapping are seen by every other mapper), and the memory freed once every handle is closed."""

from __future__ import annotations

import multiprocessing as mp

import msgspec
import pytest
import torch

from shared.kv_layout import KVLayout
from shared.pool import map_pool
from shared.protocol import PoolDescriptor
from tests.gpu._pool_procs import TIMEOUT_S, map_and_write, own_pool

LAYOUT = KVLayout(num_layers=4, num_pages=256, page_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")


def test_pool_shared_by_three_mappers_then_freed() -> None:
    ctx = mp.get_context("spawn")
    owner_end, owner_conn = ctx.Pipe()
    all_closed = ctx.Barrier(4)  # 3 mappers + owner
    written = ctx.Barrier(3)  # 3 mappers
    owner = ctx.Process(target=own_pool, args=(LAYOUT, owner_conn, all_closed))
    owner.start()
    assert owner_end.poll(TIMEOUT_S)
    desc_bytes = owner_end.recv_bytes()
    desc = msgspec.msgpack.decode(desc_bytes, type=PoolDescriptor)
    assert desc.kind == "cuda_ipc"
    assert len(desc.ipc_handle) == 64
    assert desc.num_bytes == LAYOUT.num_bytes
    assert desc.device_uuid.startswith("GPU-")

    children = []
    ends = []
    for page, value in ((1, 1.0), (2, 2.0)):
        end, conn = ctx.Pipe()
        proc = ctx.Process(target=map_and_write, args=(desc_bytes, page, value, written, all_closed, conn))
        proc.start()
        children.append(proc)
        ends.append(end)

    mapped = map_pool(desc)  # this process is the third mapper
    pool = mapped.tensor
    assert pool.shape == LAYOUT.shape
    assert pool.dtype == torch.bfloat16
    assert pool.is_cuda
    pool[:, 0].fill_(3.0)
    torch.cuda.synchronize()
    written.wait(TIMEOUT_S)
    page_elems = LAYOUT.num_layers * 2 * LAYOUT.page_size * LAYOUT.num_kv_heads * LAYOUT.head_dim
    expected = [3.0 * page_elems, 1.0 * page_elems, 2.0 * page_elems] + [0.0] * (LAYOUT.num_pages - 3)
    assert pool.float().sum(dim=(0, 2, 3, 4, 5)).tolist() == expected
    del pool
    mapped.close()
    with pytest.raises(ValueError, match="closed"):
        mapped.tensor  # noqa: B018
    for end in ends:
        assert end.poll(TIMEOUT_S)
        sums, still_open = end.recv()
        assert sums == expected
        assert still_open is False
    all_closed.wait(TIMEOUT_S)
    assert owner_end.poll(TIMEOUT_S)
    freed, owner_closed = owner_end.recv()
    assert owner_closed is True
    assert freed >= LAYOUT.num_bytes
    for proc in [*children, owner]:
        proc.join(TIMEOUT_S)
        assert proc.exitcode == 0
