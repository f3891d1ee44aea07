"""Tunables of the daemon core (the process-level config in cachemgr/config.py builds these)."""

from __future__ import annotations

from dataclasses import dataclass

DISPATCH_MODES = ("spread", "pack")


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """How the daemon talks to workers and schedules requests. All times in seconds.

    endpoint: where the ROUTER socket binds (``ipc:///path`` or ``tcp://host:port``; port 0 picks one).
    heartbeat_interval_s: told to workers in Welcome; heartbeat_timeout_s without any message from a
    worker declares it dead. max_queue bounds requests accepted but not yet on a worker (Overloaded
    beyond). page_wait_timeout_s bounds how long a request (or a PageRequest) waits for free pages;
    worker_wait_timeout_s how long an accepted request waits for a worker with capacity.
    worker_hung_timeout_s: a worker dropped for silence whose process is still alive on this host (same
    pid namespace) may still write its pages, so its leases are quarantined, not released, until the
    process is gone or this long has passed; its requests resume elsewhere at once.
    worker_stall_timeout_s: a worker that holds requests but shows no progress this long (no engine step
    completed per its heartbeats, no other message) is told to shut down and dropped like a silent one;
    0 turns the watchdog off. It must exceed the longest single engine step (one prefill chunk).
    decode_page_chunk: pages handed out per decode chunk. max_attempts: dispatches per request before a
    request whose workers keep dying fails. dispatch: which worker with a free slot gets a request,
    "spread" (the least loaded) or "pack" (the most loaded; see WorkerRegistry.pick).
    """

    endpoint: str
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    worker_hung_timeout_s: float = 60.0
    worker_stall_timeout_s: float = 120.0
    max_queue: int = 256
    page_wait_timeout_s: float = 30.0
    worker_wait_timeout_s: float = 30.0
    decode_page_chunk: int = 4
    max_attempts: int = 3
    dispatch: str = "spread"

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("ipc://", "tcp://")):
            raise ValueError(f"endpoint must start with ipc:// or tcp://, got {self.endpoint!r}")
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ValueError(
                "need 0 < heartbeat_interval_s < heartbeat_timeout_s, got "
                f"{self.heartbeat_interval_s} and {self.heartbeat_timeout_s}"
            )
        for name in ("max_queue", "decode_page_chunk", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.worker_hung_timeout_s < self.heartbeat_timeout_s:
            raise ValueError("worker_hung_timeout_s must be at least heartbeat_timeout_s")
        if self.worker_stall_timeout_s < 0:
            raise ValueError(
                f"worker_stall_timeout_s must be >= 0 (0 = off), got {self.worker_stall_timeout_s}"
            )
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}")
        for name in ("page_wait_timeout_s", "worker_wait_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
