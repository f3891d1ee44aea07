"""The Daemon facade: what the HTTP front end, the admin socket and the metrics call.

Owns the worker channel (WorkerLink), the worker registry, the scheduler and the message handlers, all
on one asyncio loop; the cache (PrefixCache) is passed in and is only ever touched from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import zmq
import zmq.asyncio

from cachemgr.daemon.errors import (
    DaemonIntegrityError,
    NoWorkers,
    Overloaded,
    PromptTooLarge,
    RequestFailed,
    ShuttingDown,
)
from cachemgr.daemon.link import WorkerLink
from cachemgr.daemon.messages import WorkerMessages
from cachemgr.daemon.scheduler import Scheduler
from cachemgr.daemon.settings import DaemonSettings
from cachemgr.daemon.state import RequestState, WorkerState
from cachemgr.daemon.stream import RequestStream
from cachemgr.daemon.workers import WorkerRegistry
from shared.protocol import PoolDescriptor, SamplingParams, Shutdown

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.05


class Daemon:
    """Accepts requests (``submit``), runs them on registered workers, streams their tokens back.

    ``start()`` binds the worker socket and starts the reader and the heartbeat reaper; ``stop()`` tells
    workers to shut down, ends every stream (RequestFailed), releases every lease and closes the socket.
    The pool memory itself belongs to the caller (see cachemgr.main).
    """

    def __init__(
        self,
        *,
        cache: Any,
        pool: PoolDescriptor,
        settings: DaemonSettings,
        model_name: str,
        max_context_len: int,
        vocab_size: int | None = None,
        tokenizer: Any = None,
        metrics: Any = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if max_context_len < 2:
            raise ValueError(f"max_context_len must be at least 2, got {max_context_len}")
        self.cache = cache
        self.model_name = model_name
        self.settings = settings
        self.pool = pool
        self.max_context_len = max_context_len
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._own_context = context is None
        self._context = context if context is not None else zmq.asyncio.Context()
        self._workers = WorkerRegistry(settings.dispatch)
        self._scheduler = Scheduler(
            cache, None, self._workers, settings, page_size=pool.page_size, metrics=metrics
        )  # type: ignore[arg-type]
        self._messages = WorkerMessages(self._scheduler, pool, model_name)
        self._link: WorkerLink | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self._accepting = False
        self.draining = False  # begin_drain: new requests are refused while the accepted ones finish

    @property
    def metrics(self) -> Any:
        return self._scheduler.metrics

    @metrics.setter
    def metrics(self, metrics: Any) -> None:
        """Attach the Metrics object (built after the daemon, since it reads the daemon)."""
        self._scheduler.metrics = metrics

    @property
    def endpoint(self) -> str:
        """The bound worker endpoint (with the real port for tcp://...:0). Valid after start()."""
        if self._link is None:
            raise ValueError("the daemon is not started")
        return self._link.endpoint

    @property
    def context(self) -> zmq.asyncio.Context:
        return self._context

    async def start(self) -> None:
        if self._link is not None:
            raise ValueError("the daemon is already started")
        self._link = WorkerLink(self._context, self.settings.endpoint, self._messages.handle)
        self._scheduler.link = self._link
        self._link.start()
        self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="heartbeat-reaper")
        self._accepting = True
        logger.info("daemon listening for workers on %s", self._link.endpoint)

    def begin_drain(self) -> None:
        """Refuse new requests (ShuttingDown) and let the accepted ones run on; see `wait_idle`."""
        self.draining = True

    async def wait_idle(self, timeout_s: float, interrupt: asyncio.Event | None = None) -> bool:
        """Wait until no accepted request is left (running or queued), at most `timeout_s` seconds or until
        `interrupt` is set. Returns whether none is left."""
        deadline = time.monotonic() + timeout_s
        while self._scheduler.requests:
            if time.monotonic() >= deadline or (interrupt is not None and interrupt.is_set()):
                return False
            await asyncio.sleep(_IDLE_POLL_S)
        return True

    async def stop(self) -> None:
        """Idempotent. Streams still open end with RequestFailed("daemon shutting down")."""
        if self._link is None:
            return
        self._accepting = False
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for worker in self._workers:
            self._link.send(worker.identity, Shutdown(reason="daemon shutting down"))
        for req in list(self._scheduler.requests.values()):
            if req.admit_task is not None:
                req.admit_task.cancel()
            self._scheduler.fail(req, RequestFailed("daemon shutting down"))
        await asyncio.sleep(0)  # let cancelled admissions unwind
        await self._messages.close()
        await self._link.close()
        self._link = None
        if self._own_context:
            self._context.term()

    # ------------------------------------------------------------------ requests

    async def submit(
        self,
        namespace: Any,
        token_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams,
        *,
        request_id: bytes | None = None,
    ) -> RequestStream:
        """Accept a request. Raises ValueError (bad input), PromptTooLarge, NoWorkers or Overloaded,
        each before anything changed. The stream raises RequestFailed if the request later fails."""
        sampling.validate()
        tokens = self._checked_tokens(token_ids)
        n, page = len(tokens), self.pool.page_size
        if n >= self.max_context_len:
            raise self._reject(
                PromptTooLarge(
                    f"prompt of {n} tokens leaves no room in the model's context of {self.max_context_len}"
                ),
                "too_large",
            )
        if math.ceil(n / page) + 1 > self.pool.num_pages:
            raise self._reject(
                PromptTooLarge(
                    f"prompt of {n} tokens can never fit the KV pool of {self.pool.num_pages} pages of {page}"
                ),
                "too_large",
            )
        if not self._accepting:
            raise self._reject(NoWorkers("the daemon is not running"), "no_workers")
        if self.draining:
            raise self._reject(ShuttingDown("the server is shutting down"), "shutting_down")
        if len(self._workers) == 0:
            raise self._reject(NoWorkers("no compute worker is registered"), "no_workers")
        if self._scheduler.num_waiting >= self.settings.max_queue:
            raise self._reject(
                Overloaded(f"{self._scheduler.num_waiting} requests are already waiting"), "overloaded"
            )
        if request_id is None:
            request_id = os.urandom(16)
        elif not 1 <= len(request_id) <= 64 or request_id in self._scheduler.requests:
            raise ValueError("request_id must be 1-64 bytes and not in use")
        if sampling.max_tokens > self.max_context_len - n:
            cap = self.max_context_len - n
            sampling = msgspec.structs.replace(
                sampling, max_tokens=cap, min_tokens=min(sampling.min_tokens, cap)
            )
        stream = RequestStream(request_id, n, lambda: self._scheduler.abort(req))
        req = RequestState(request_id, namespace, tokens, sampling, stream, submitted_at=time.monotonic())
        self._scheduler.counters["requests_total"] += 1
        self._scheduler.enqueue(req)
        return stream

    def _checked_tokens(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        tokens = np.asarray(token_ids)
        if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError("token_ids must be a non-empty flat sequence of integers")
        upper = self.vocab_size if self.vocab_size is not None else np.iinfo(np.int32).max
        if tokens.min() < 0 or tokens.max() >= upper:
            raise ValueError(f"token ids must be in [0, {upper})")
        return tokens.astype(np.int32)

    def _reject(self, error: Exception, outcome: str) -> Exception:
        if self.metrics is not None:
            self.metrics.count_request(outcome)
        return error

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, computed off the event loop."""
        if self._tokenizer is None:
            raise ValueError("this daemon has no tokenizer")
        return list(await asyncio.get_running_loop().run_in_executor(None, self._tokenizer.encode, text))

    # ------------------------------------------------------------------ introspection (read only)

    def stats(self) -> dict[str, Any]:
        s = self._scheduler
        running = sum(len(w.request_ids) for w in self._workers)
        return {
            "workers": len(self._workers),
            "ready_workers": self._workers.num_ready,
            "queue_depth": s.num_waiting,
            "running": running,
            **s.counters,
            "bad_messages": self._link.num_bad_messages if self._link is not None else 0,
            "endpoint": self._link.endpoint if self._link is not None else "",
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }

    def workers_info(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "worker_id": w.worker_id,
                "name": w.name,
                "pid": w.pid,
                "device": w.device,
                "model": w.model,
                "max_running": w.max_running,
                "running": len(w.request_ids),
                "reported_running": w.reported_running,
                "reported_waiting": w.reported_waiting,
                "last_seen_s": round(now - w.last_seen, 3),
                "registered_s": round(now - w.registered_at, 3),
                "ready": w.ready,
            }
            for w in self._workers
        ]

    def leases_info(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "lease_id": req.lease_id,
                "request_id": req.request_id.hex(),
                "worker_id": req.worker.worker_id if req.worker is not None else None,
                "prompt_len": len(req.prompt),
                "cached_tokens": req.stream.cached_tokens,
                "generated": len(req.generated),
                "owned_pages": len(self.cache.lease_owned_pages(req.lease_id)),
                "attempt": req.attempt,
                "aborted": req.aborted,
                "age_s": round(now - req.submitted_at, 3),
            }
            for req in self._scheduler.requests.values()
            if req.lease_id is not None
        ]

    def check(self) -> None:
        """The cache's invariant plus the daemon's: every lease belongs to exactly one live request on a
        live worker, and workers' request sets match. Raises IntegrityError / DaemonIntegrityError."""
        self.cache.check()
        requests = self._scheduler.requests
        leased = [r for r in requests.values() if r.lease_id is not None]
        num_leases = self.cache.stats().num_leases
        num_quarantined = len(self._scheduler.quarantine)
        if num_leases != len(leased) + num_quarantined:
            raise DaemonIntegrityError(
                f"cache has {num_leases} leases, requests hold {len(leased)}, {num_quarantined} quarantined"
            )
        for req in leased:
            if not self.cache.has_lease(req.lease_id):
                raise DaemonIntegrityError(
                    f"request {req.request_id.hex()} holds unknown lease {req.lease_id}"
                )
        live = {w.worker_id for w in self._workers}
        for worker in self._workers:
            for request_id in worker.request_ids:
                req = requests.get(request_id)
                if req is None or req.worker is not worker:
                    raise DaemonIntegrityError(
                        f"worker {worker.worker_id} lists request {request_id.hex()} it does not run"
                    )
        for req in requests.values():
            if req.worker is not None and req.worker.worker_id not in live:
                raise DaemonIntegrityError(
                    f"request {req.request_id.hex()} is on dead worker {req.worker.worker_id}"
                )

    # ------------------------------------------------------------------ internals

    async def _reap(self) -> None:
        period = self.settings.heartbeat_interval_s / 2
        while True:
            await asyncio.sleep(period)
            self._scheduler.release_quarantined()
            for worker in self._workers.stale(self.settings.heartbeat_timeout_s):
                self._drop(worker, f"no message for {self.settings.heartbeat_timeout_s}s", tell=False)
            stall_s = self.settings.worker_stall_timeout_s
            for worker in self._workers.stalled(stall_s) if stall_s else ():
                # Told to stop, or it would register again and take new requests into the same hang.
                why = f"no progress for {stall_s}s with {len(worker.request_ids)} requests (stalled)"
                self._drop(worker, why, tell=True)

    def _drop(self, worker: WorkerState, why: str, *, tell: bool) -> None:
        """Drop a worker the reaper gave up on (``tell``: send it Shutdown first); never raises."""
        try:
            if tell:
                self._link.send(worker.identity, Shutdown(reason=f"the daemon dropped this worker: {why}"))
            self._messages.drop_worker(worker, why)
        except Exception:
            logger.exception("dropping worker %d failed", worker.worker_id)
