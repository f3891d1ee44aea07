"""Admission and request lifecycle: match, wait, lock, allocate, dispatch; finish, fail, re-dispatch.

An admission never holds a lease across an await: it matches, opens the lease, allocates and sends the
Dispatch in one synchronous step, and if pages or a worker are missing it gives everything back and
waits with nothing locked. So waiting requests can never starve each other of pages, and cancelling
an admission task (client abort) at any await leaks nothing.

Token ranges of one dispatch (page = 4)::

    tokens:  | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9       |
    pages:   | prefix (cached, shared)   | new: suffix pages + a decode chunk ...
             |<-------- matched_len ----->|  capped so at least one prompt token is computed:
                                              matched_len <= floor((n - 1) / page) * page
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import msgspec
import numpy as np

from cachemgr.daemon.errors import RequestFailed
from cachemgr.daemon.link import WorkerLink
from cachemgr.daemon.settings import DaemonSettings
from cachemgr.daemon.state import RequestState, Signal, WorkerState, wait_until
from cachemgr.daemon.stream import StreamEvent
from cachemgr.daemon.workers import WorkerRegistry
from shared.ids import ids_to_bytes
from shared.process_identity import process_alive
from shared.protocol import Abort, Dispatch, FinishReason

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns every accepted request until its stream ends and its lease is released. Loop thread only.

    Invariants: a request has a lease iff it is on a worker (or aborted and awaiting the worker's
    Finished); ``worker.request_ids`` holds exactly the requests whose ``worker`` is that worker.
    """

    def __init__(
        self,
        cache: Any,
        link: WorkerLink,
        workers: WorkerRegistry,
        settings: DaemonSettings,
        *,
        page_size: int,
        metrics: Any = None,
    ) -> None:
        self.cache = cache
        self.link = link
        self.workers = workers
        self.settings = settings
        self.metrics = metrics
        self.page_size = page_size
        self.requests: dict[bytes, RequestState] = {}
        self.pages_freed = Signal()
        self._lease_events: dict[int, asyncio.Event] = {}
        self.quarantine: dict[int, tuple[int, float]] = {}  # lease id -> (pid that may write, deadline)
        self.num_waiting = 0  # accepted, not yet on a worker (the bounded queue)
        self.counters = dict.fromkeys(
            ("requests_total", "requests_finished", "requests_failed", "requests_aborted", "redispatches"), 0
        )

    # ------------------------------------------------------------------ admission

    def enqueue(self, req: RequestState) -> None:
        self.requests[req.request_id] = req
        self.num_waiting += 1
        req.admit_task = asyncio.get_running_loop().create_task(self._admit(req))

    async def _admit(self, req: RequestState) -> None:
        try:
            await self._admit_until_dispatched(req)
        except RequestFailed as exc:
            self.fail(req, exc)
        except Exception as exc:  # a bug must end the stream, not leave the client hanging
            logger.exception("admitting request %s failed", req.request_id.hex())
            self.fail(req, RequestFailed(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            self.num_waiting -= 1
            req.admit_task = None

    async def _admit_until_dispatched(self, req: RequestState) -> None:
        settings = self.settings
        tokens = req.known_tokens(len(req.prompt) + len(req.generated))
        n = len(tokens)
        cap = (n - 1) // self.page_size * self.page_size
        if _scores_prompt(req):
            cap = 0  # prompt logprobs need every prompt position's logits: nothing comes from the cache
        page_deadline = time.monotonic() + settings.page_wait_timeout_s
        worker_deadline = time.monotonic() + settings.worker_wait_timeout_s
        wait_for_pending = True
        while True:
            capacity = self.workers.capacity.current()
            if self.workers.pick() is None:
                if not await wait_until(capacity, worker_deadline):
                    raise RequestFailed(
                        f"no worker with a free slot within {settings.worker_wait_timeout_s}s"
                    )
                continue
            match = self.cache.match(req.namespace, tokens)
            pending = match.pending_lease_id
            if wait_for_pending and pending is not None and min(match.pending_len, cap) > match.matched_len:
                # Another request is computing a longer prefix right now: wait for its commit or release
                # instead of computing the same pages twice.
                event = self._lease_events.setdefault(pending, asyncio.Event())
                wait_for_pending = await wait_until(event, page_deadline)
                continue
            freed = self.pages_freed.current()
            if self._try_dispatch(req, tokens, cap, match):
                return
            if not await wait_until(freed, page_deadline):
                raise RequestFailed(f"no KV pages freed up within {settings.page_wait_timeout_s}s")

    def _try_dispatch(self, req: RequestState, tokens: np.ndarray, cap: int, match: Any) -> bool:
        """Lease, allocate and send in one step; on any shortage give everything back, return False."""
        worker = self.workers.pick()
        if worker is None:
            return False
        lease = self.cache.open_lease(req.namespace, tokens, match=match)
        n, page = len(tokens), self.page_size
        use_len = min(lease.matched_len, cap)
        use_pages = use_len // page
        prompt_pages = math.ceil(n / page)
        max_tokens = req.sampling.max_tokens - len(req.generated)
        wanted = min(math.ceil((n + max_tokens) / page), prompt_pages + self.settings.decode_page_chunk)
        new_pages = self.cache.allocate(lease.lease_id, wanted - use_pages)
        if new_pages is None and wanted > prompt_pages:
            new_pages = self.cache.allocate(lease.lease_id, prompt_pages - use_pages)
        if new_pages is None:
            self._release_lease(lease.lease_id)
            return False
        req.lease_id = lease.lease_id
        req.worker = worker
        if not worker.request_ids:  # the stall clock starts when an idle worker gets work
            worker.progress_at = time.monotonic()
        worker.request_ids.add(req.request_id)
        sampling = req.sampling
        if req.generated:  # a re-dispatch: the budgets count what this attempt still has to generate
            min_tokens = max(0, sampling.min_tokens - len(req.generated))
            sampling = msgspec.structs.replace(sampling, max_tokens=max_tokens, min_tokens=min_tokens)
        if sampling.prompt_logprobs >= 0 and not _scores_prompt(req):  # delivered by an earlier attempt
            sampling = msgspec.structs.replace(sampling, prompt_logprobs=-1)
        dispatch = Dispatch(
            request_id=req.request_id,
            tokens=ids_to_bytes(tokens),
            matched_len=use_len,
            prefix_page_ids=ids_to_bytes(np.asarray(lease.prefix_page_ids)[:use_pages]),
            new_page_ids=ids_to_bytes(new_pages),
            sampling=sampling,
            attempt=req.attempt,
            num_generated=len(req.generated),
        )
        self.link.send(worker.identity, dispatch)
        if req.attempt == 0:
            req.stream._mark_dispatched(use_len)
        return True

    # ------------------------------------------------------------------ endings

    def _release_lease(self, lease_id: int) -> None:
        self.cache.release(lease_id)
        event = self._lease_events.pop(lease_id, None)
        if event is not None:
            event.set()
        self.pages_freed.notify()

    def lease_committed(self, lease_id: int, num_freed: int) -> None:
        """Wake requests waiting for this lease's pending prefix (and for pages, if duplicates were freed)."""
        event = self._lease_events.pop(lease_id, None)
        if event is not None:
            event.set()
        if num_freed:
            self.pages_freed.notify()

    def _detach(self, req: RequestState) -> None:
        """Take the request off its worker and give its lease back."""
        if req.worker is not None:
            req.worker.request_ids.discard(req.request_id)
            req.worker = None
            self.workers.capacity.notify()
        if req.abort_timer is not None:
            req.abort_timer.cancel()
            req.abort_timer = None
        if req.lease_id is not None:
            lease_id, req.lease_id = req.lease_id, None
            self._release_lease(lease_id)

    def finish(self, req: RequestState, reason: FinishReason, stop_text: str = "") -> None:
        """The request is done: lease released, stream ended, metrics recorded."""
        self._detach(req)
        self.requests.pop(req.request_id, None)
        if req.aborted:
            return  # the stream already ended (and was counted) when the client aborted
        req.stream._push(StreamEvent([], reason, stop_text))
        self.counters["requests_finished"] += 1
        self._record_end(req, reason.value)

    def fail(self, req: RequestState, error: RequestFailed) -> None:
        self._detach(req)
        self.requests.pop(req.request_id, None)
        if req.aborted:
            return
        logger.warning("request %s failed: %s", req.request_id.hex(), error)
        req.stream._fail(error)
        self.counters["requests_failed"] += 1
        self._record_end(req, "error")

    def abort(self, req: RequestState) -> None:
        """Client abort: end the stream now. A request on a worker keeps its lease until the worker's
        Finished (its kernels may still write the pages) or a heartbeat timeout, whichever is first."""
        if req.aborted or req.stream.finished:
            return
        req.aborted = True
        req.stream._push(StreamEvent([], FinishReason.ABORT))
        self.counters["requests_aborted"] += 1
        self._record_end(req, "abort")
        if req.admit_task is not None:
            req.admit_task.cancel()  # holds nothing across awaits
            self.requests.pop(req.request_id, None)
        elif req.worker is not None:
            self.link.send(req.worker.identity, Abort(request_id=req.request_id, reason="client aborted"))
            loop = asyncio.get_running_loop()
            req.abort_timer = loop.call_later(
                self.settings.heartbeat_timeout_s, self.finish, req, FinishReason.ABORT
            )

    def redispatch_all(self, worker: WorkerState, why: str, *, quarantine_pid: int | None = None) -> None:
        """The worker is gone: release its leases (unwritten pages go back to free) and resume each of
        its requests elsewhere. With ``quarantine_pid`` (the process may still be writing), its leases
        are kept, with no pending prefixes, until that process is gone (``release_quarantined``)."""
        deadline = time.monotonic() + self.settings.worker_hung_timeout_s
        for request_id in list(worker.request_ids):
            req = self.requests[request_id]
            if quarantine_pid is not None and req.lease_id is not None:
                lease_id, req.lease_id = req.lease_id, None
                self.cache.cancel_pending(lease_id)
                self.quarantine[lease_id] = (quarantine_pid, deadline)
                self.lease_committed(lease_id, 0)  # wake requests waiting for its pending prefix
            self.redispatch(req, why)

    def release_quarantined(self) -> None:
        """Release quarantined leases whose process is gone (or that waited worker_hung_timeout_s)."""
        if not self.quarantine:
            return
        now = time.monotonic()
        for lease_id, (pid, deadline) in list(self.quarantine.items()):
            if now >= deadline or not process_alive(pid):
                del self.quarantine[lease_id]
                self._release_lease(lease_id)

    def redispatch(self, req: RequestState, why: str) -> None:
        """Resume a request on another worker from its last streamed token: the new attempt's tokens are
        prompt + everything streamed so far and its max_tokens is what is left, so the client sees no
        gap and no repeat."""
        self._detach(req)
        if req.aborted:
            self.requests.pop(req.request_id, None)
            return
        if req.sampling.max_tokens - len(req.generated) <= 0:
            self.finish(req, FinishReason.LENGTH)
        elif req.attempt + 1 >= self.settings.max_attempts:
            self.fail(req, RequestFailed(f"gave up after {req.attempt + 1} attempts; last: {why}"))
        else:
            req.attempt += 1
            self.counters["redispatches"] += 1
            logger.info("re-dispatching request %s (attempt %d): %s", req.request_id.hex(), req.attempt, why)
            self.enqueue(req)

    def _record_end(self, req: RequestState, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_e2e(time.monotonic() - req.submitted_at)
            self.metrics.count_request(outcome)


def _scores_prompt(req: RequestState) -> bool:
    """Whether this attempt must compute the prompt's logprobs (asked for, not delivered yet)."""
    return req.sampling.prompt_logprobs >= 0 and not req.prompt_scored
