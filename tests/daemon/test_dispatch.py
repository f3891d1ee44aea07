"""Which worker gets a request: spread (least loaded) or pack (busiest with a free slot)."""

from __future__ import annotations

import pytest

from cachemgr.daemon.settings import DaemonSettings
from cachemgr.daemon.workers import WorkerRegistry
from shared.protocol import PROTOCOL_VERSION, Register


def _registry(dispatch: str, slots: tuple[int, ...]) -> WorkerRegistry:
    reg = WorkerRegistry(dispatch)
    for i, max_running in enumerate(slots):
        reg.add(f"w{i}".encode(), Register(PROTOCOL_VERSION, 100 + i, "cuda:0", max_running, "m"))
    return reg


def _give(reg: WorkerRegistry, n: int) -> list[int]:
    """Dispatch n requests one by one; the worker id each went to (None-free: asserts a slot)."""
    got = []
    for k in range(n):
        worker = reg.pick()
        assert worker is not None
        worker.request_ids.add(f"r{len(got)}-{k}".encode())
        got.append(worker.worker_id)
    return got


def test_spread_alternates_between_equally_loaded_workers() -> None:
    assert _give(_registry("spread", (4, 4)), 6) == [1, 2, 1, 2, 1, 2]


def test_pack_fills_the_first_worker_then_overflows() -> None:
    reg = _registry("pack", (3, 3))
    assert _give(reg, 6) == [1, 1, 1, 2, 2, 2]
    assert reg.pick() is None  # every slot taken


def test_pack_returns_to_the_busiest_worker_when_a_slot_frees() -> None:
    reg = _registry("pack", (3, 3))
    _give(reg, 4)  # worker 1 full, worker 2 holds one
    first = next(w for w in reg if w.worker_id == 1)
    first.request_ids.pop()
    assert reg.pick() is first  # 2 running beats 1: the batch stays on one worker


def test_pack_with_idle_workers_takes_the_longest_registered() -> None:
    assert _give(_registry("pack", (2, 2, 2)), 1) == [1]


@pytest.mark.parametrize("dispatch", ["spread", "pack"])
def test_a_worker_warming_up_gets_nothing_until_it_is_ready(dispatch: str) -> None:
    reg = WorkerRegistry(dispatch)
    warming = reg.add(b"w0", Register(PROTOCOL_VERSION, 100, "cuda:0", 4, "m", ready=False))
    assert reg.pick() is None and reg.num_ready == 0
    ready = reg.add(b"w1", Register(PROTOCOL_VERSION, 101, "cuda:0", 4, "m"))
    assert _give(reg, 3) == [ready.worker_id] * 3
    waiting = reg.capacity.current()
    reg.mark_ready(warming)
    assert waiting.is_set()  # dispatches waiting for a slot look again
    assert reg.num_ready == 2
    assert reg.pick() is (warming if dispatch == "spread" else ready)


def test_unknown_dispatch_is_refused() -> None:
    with pytest.raises(ValueError, match="dispatch"):
        WorkerRegistry("random")
    with pytest.raises(ValueError, match="dispatch"):
        DaemonSettings(endpoint="ipc:///tmp/x", dispatch="random")
