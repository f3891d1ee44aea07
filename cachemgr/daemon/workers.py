"""Registered workers: who is alive, how loaded, and who gets the next request."""

from __future__ import annotations

import time
from collections.abc import Iterator

from cachemgr.daemon.settings import DISPATCH_MODES
from cachemgr.daemon.state import Signal, WorkerState
from shared.process_identity import pid_namespace_id
from shared.protocol import Register


class WorkerRegistry:
    """Workers keyed by ZeroMQ identity. ``capacity`` is notified whenever a worker joins or a slot
    frees up, so waiting dispatches re-check. Load is the daemon's own count of requests it dispatched
    to a worker and has not seen finish (exact, unlike heartbeat reports, which lag).

    dispatch: "spread" gives a request to the least-loaded worker with a free slot, "pack" to the most
    loaded one. Packing is for workers that share one device (a GPU pool: every worker of this daemon
    computes on the pool's GPU): each engine step reads all of a worker's weights, so two workers that
    split a batch read them twice as often for the same tokens (on an H200, 8B shape: 247 decode steps of
    33 sequences instead of 127 of 64, 0.9x the throughput of one worker). Packed, a second worker takes
    requests only while the first has no free slot, and takes over the first's requests if it dies."""

    def __init__(self, dispatch: str = "spread") -> None:
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
        self.dispatch = dispatch
        self._by_identity: dict[bytes, WorkerState] = {}
        self._next_id = 1
        self.capacity = Signal()

    def __len__(self) -> int:
        return len(self._by_identity)

    def __iter__(self) -> Iterator[WorkerState]:
        return iter(list(self._by_identity.values()))

    def get(self, identity: bytes) -> WorkerState | None:
        return self._by_identity.get(identity)

    def add(self, identity: bytes, reg: Register) -> WorkerState:
        """Register a new worker (the caller dropped any previous one of this identity)."""
        assert identity not in self._by_identity
        now = time.monotonic()
        worker = WorkerState(
            worker_id=self._next_id,
            identity=identity,
            pid=reg.pid,
            device=reg.device,
            max_running=reg.max_running,
            name=reg.name,
            model=reg.model,
            registered_at=now,
            last_seen=now,
            progress_at=now,
            same_pid_namespace=reg.pid_namespace != 0 and reg.pid_namespace == pid_namespace_id(),
            ready=reg.ready,
        )
        self._next_id += 1
        self._by_identity[identity] = worker
        self.capacity.notify()
        return worker

    def mark_ready(self, worker: WorkerState) -> None:
        """The worker has warmed up: from now on it takes requests."""
        worker.ready = True
        self.capacity.notify()

    @property
    def num_ready(self) -> int:
        return sum(w.ready for w in self._by_identity.values())

    def remove(self, worker: WorkerState) -> None:
        del self._by_identity[worker.identity]
        self.capacity.notify()

    def pick(self) -> WorkerState | None:
        """The least-loaded (spread) or most-loaded (pack) ready worker with a free slot, or None. Ties go
        to the longest registered."""
        free = [w for w in self._by_identity.values() if w.ready and w.has_capacity]
        if not free:
            return None
        choose = max if self.dispatch == "pack" else min  # both keep the first of equals
        return choose(free, key=lambda w: len(w.request_ids))

    def stalled(self, timeout_s: float) -> list[WorkerState]:
        """Workers holding requests that showed no progress for longer than ``timeout_s``."""
        cutoff = time.monotonic() - timeout_s
        return [w for w in self._by_identity.values() if w.request_ids and w.progress_at < cutoff]

    def stale(self, timeout_s: float) -> list[WorkerState]:
        """Workers silent for longer than ``timeout_s``."""
        cutoff = time.monotonic() - timeout_s
        return [w for w in self._by_identity.values() if w.last_seen < cutoff]
