"""What the daemon does with each decoded worker message.

Every handler validates first and changes state only once the message is known to be good: a bad
message gets a typed ErrorReply and leaves the cache, the leases and the requests exactly as they were.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import numpy as np

from cachemgr.daemon.errors import RequestFailed
from cachemgr.daemon.scheduler import Scheduler
from cachemgr.daemon.state import RequestState, WorkerState, pack_ids, wait_until
from cachemgr.daemon.stream import LogprobEntry, StreamEvent
from shared.ids import bytes_to_ids
from shared.process_identity import process_alive
from shared.protocol import (
    PROTOCOL_VERSION,
    Commit,
    CommitAck,
    ErrorCode,
    Finished,
    FinishReason,
    Generated,
    Goodbye,
    Heartbeat,
    PageRequest,
    PagesGranted,
    PoolDescriptor,
    PromptLogprobs,
    Register,
    Welcome,
    WorkerError,
)

logger = logging.getLogger(__name__)


class BadMessage(Exception):
    """A message that must be refused with ErrorReply(code); nothing was changed."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class WorkerMessages:
    """Routes WorkerToDaemon messages by type. Loop thread only."""

    def __init__(self, scheduler: Scheduler, pool: PoolDescriptor, model_name: str) -> None:
        self.s = scheduler
        self.pool = pool
        self.model_name = model_name
        self._page_waits: set[asyncio.Task[None]] = set()
        self._handlers: dict[type, Any] = {
            Heartbeat: self._heartbeat,
            Commit: self._commit,
            PageRequest: self._page_request,
            Generated: self._generated,
            PromptLogprobs: self._prompt_logprobs,
            Finished: self._finished,
            WorkerError: self._worker_error,
            Goodbye: self._goodbye,
        }

    def handle(self, identity: bytes, msg: Any) -> None:
        if type(msg) is Register:
            self._register(identity, msg)
            return
        worker = self.s.workers.get(identity)
        request_id = getattr(msg, "request_id", b"")
        if worker is None:
            self.s.link.reply_error(identity, ErrorCode.NOT_REGISTERED, "register first", request_id)
            return
        worker.last_seen = now = time.monotonic()
        if type(msg) is not Heartbeat:
            worker.progress_at = now
        try:
            self._handlers[type(msg)](worker, msg)
        except BadMessage as exc:
            self.s.link.reply_error(identity, exc.code, str(exc), request_id)

    def drop_worker(self, worker: WorkerState, why: str) -> None:
        """Forget a worker and resume its requests elsewhere."""
        logger.warning("worker %d (pid %d) gone: %s", worker.worker_id, worker.pid, why)
        self.s.workers.remove(worker)
        # Silent is not dead: a stalled worker may wake up and finish writing its pages. While its process
        # lives, those pages must not go to anyone else.
        may_write = worker.same_pid_namespace and worker.pid != os.getpid() and process_alive(worker.pid)
        self.s.redispatch_all(worker, why, quarantine_pid=worker.pid if may_write else None)

    async def close(self) -> None:
        for task in list(self._page_waits):
            task.cancel()
        await asyncio.gather(*self._page_waits, return_exceptions=True)

    # ------------------------------------------------------------------ lifecycle

    def _register(self, identity: bytes, msg: Register) -> None:
        if msg.protocol_version != PROTOCOL_VERSION:
            self.s.link.reply_error(
                identity,
                ErrorCode.BAD_VERSION,
                f"daemon speaks protocol {PROTOCOL_VERSION}, not {msg.protocol_version}",
            )
            return
        if msg.max_running < 1:
            self.s.link.reply_error(identity, ErrorCode.MALFORMED, "max_running must be at least 1")
            return
        if msg.model and msg.model != self.model_name:
            logger.warning(
                "worker pid %d runs model %r, the daemon serves %r", msg.pid, msg.model, self.model_name
            )
        old = self.s.workers.get(identity)
        if old is not None:
            self.drop_worker(old, "registered again (restarted)")
        worker = self.s.workers.add(identity, msg)
        logger.info(
            "worker %d registered: pid %d on %s, max_running %d",
            worker.worker_id,
            msg.pid,
            msg.device,
            msg.max_running,
        )
        settings = self.s.settings
        welcome = Welcome(
            protocol_version=PROTOCOL_VERSION,
            worker_id=worker.worker_id,
            pool=self.pool,
            model=self.model_name,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            decode_page_chunk=settings.decode_page_chunk,
        )
        self.s.link.send(identity, welcome)

    def _heartbeat(self, worker: WorkerState, msg: Heartbeat) -> None:
        if msg.ready and not worker.ready:
            logger.info(
                "worker %d ready after %.1f s of warm-up",
                worker.worker_id,
                worker.last_seen - worker.registered_at,
            )
            self.s.workers.mark_ready(worker)
        worker.reported_running = msg.num_running
        worker.reported_waiting = msg.num_waiting
        if msg.steps_done != worker.steps_done:
            worker.steps_done = msg.steps_done
            worker.progress_at = worker.last_seen

    def _goodbye(self, worker: WorkerState, msg: Goodbye) -> None:
        self.drop_worker(worker, f"said goodbye ({msg.reason or 'no reason'})")

    def _worker_error(self, worker: WorkerState, msg: WorkerError) -> None:
        if not msg.request_id:
            self.drop_worker(worker, f"reported a fatal error: {msg.code.value}: {msg.message}")
            return
        req = self._owned(worker, msg.request_id)
        logger.warning(
            "worker %d failed request %s: %s: %s",
            worker.worker_id,
            msg.request_id.hex(),
            msg.code.value,
            msg.message,
        )
        if msg.code in (ErrorCode.MALFORMED, ErrorCode.TOO_LARGE, ErrorCode.BAD_PAGES):
            # Deterministic problems with the request itself: another worker would fail it the same way.
            self.s.fail(req, RequestFailed(f"worker error {msg.code.value}: {msg.message}"))
            return
        self.s.redispatch(req, f"worker error {msg.code.value}: {msg.message}")

    # ------------------------------------------------------------------ requests

    def _owned(self, worker: WorkerState, request_id: bytes) -> RequestState:
        req = self.s.requests.get(request_id)
        if req is None or req.worker is not worker:
            raise BadMessage(
                ErrorCode.UNKNOWN_REQUEST, f"request {request_id.hex()} is not running on this worker"
            )
        return req

    def _checked_commit(self, req: RequestState, tokens_raw: bytes, pages_raw: bytes) -> Any:
        """Validate a commit against what the daemon knows, then apply it. Raises BadMessage."""
        if len(tokens_raw) % 4 or len(pages_raw) % 4:
            raise BadMessage(ErrorCode.MALFORMED, "id arrays must be int32 bytes")
        num_tokens, num_page_ids = len(tokens_raw) // 4, len(pages_raw) // 4
        page = self.s.page_size
        if not num_tokens or num_tokens % page or num_page_ids != num_tokens // page:
            raise BadMessage(
                ErrorCode.BAD_PAGES,
                f"commit needs whole pages: {num_tokens} tokens with {num_page_ids} page ids",
            )
        if num_tokens > len(req.prompt) + len(req.generated):
            raise BadMessage(
                ErrorCode.BAD_PAGES,
                f"commit of {num_tokens} tokens, only {len(req.prompt) + len(req.generated)} known",
            )
        # Byte-wise: a worker may only share the tokens it was asked to compute (no cache poisoning).
        if tokens_raw != req.known_bytes(num_tokens):
            raise BadMessage(ErrorCode.BAD_PAGES, "committed tokens differ from the request's tokens")
        tokens, page_ids = bytes_to_ids(tokens_raw), bytes_to_ids(pages_raw)
        try:
            result = self.s.cache.commit(req.lease_id, tokens, page_ids)
        except ValueError as exc:
            raise BadMessage(ErrorCode.BAD_PAGES, str(exc)) from None
        self.s.lease_committed(req.lease_id, result.num_duplicate_pages)
        return result

    def _commit(self, worker: WorkerState, msg: Commit) -> None:
        req = self._owned(worker, msg.request_id)
        result = self._checked_commit(req, msg.tokens, msg.page_ids)
        self.s.link.send(
            worker.identity, CommitAck(request_id=msg.request_id, page_ids=pack_ids(result.page_ids))
        )

    def _page_request(self, worker: WorkerState, msg: PageRequest) -> None:
        req = self._owned(worker, msg.request_id)
        if not 1 <= msg.num_pages <= self.pool.num_pages:
            raise BadMessage(ErrorCode.MALFORMED, f"num_pages must be in [1, {self.pool.num_pages}]")
        pages = self.s.cache.allocate(req.lease_id, msg.num_pages)
        if pages is not None:
            self.s.link.send(
                worker.identity, PagesGranted(request_id=msg.request_id, page_ids=pack_ids(pages))
            )
            return
        task = asyncio.get_running_loop().create_task(self._wait_for_pages(worker, req, msg.num_pages))
        self._page_waits.add(task)
        task.add_done_callback(self._page_waits.discard)

    async def _wait_for_pages(self, worker: WorkerState, req: RequestState, num_pages: int) -> None:
        deadline = time.monotonic() + self.s.settings.page_wait_timeout_s
        while True:
            freed = self.s.pages_freed.current()
            if req.worker is not worker or req.lease_id is None:
                return  # finished, aborted or re-dispatched meanwhile: nobody needs the pages
            pages = self.s.cache.allocate(req.lease_id, num_pages)
            if pages is not None:
                self.s.link.send(
                    worker.identity, PagesGranted(request_id=req.request_id, page_ids=pack_ids(pages))
                )
                return
            if not await wait_until(freed, deadline):
                self.s.link.reply_error(
                    worker.identity,
                    ErrorCode.NO_ROOM,
                    f"no {num_pages} free pages within the wait timeout",
                    req.request_id,
                )
                return

    def _generated(self, worker: WorkerState, msg: Generated) -> None:
        req = self._owned(worker, msg.request_id)
        try:
            tokens = bytes_to_ids(msg.tokens).tolist()
        except ValueError as exc:
            raise BadMessage(ErrorCode.MALFORMED, str(exc)) from None
        if not tokens or req.aborted:
            return
        if len(req.generated) + len(tokens) > req.sampling.max_tokens:
            # A buggy or hostile worker must not grow the daemon's buffers (or the client's output)
            # beyond what the request asked for.
            raise BadMessage(
                ErrorCode.MALFORMED,
                f"{len(tokens)} more tokens exceed max_tokens {req.sampling.max_tokens} "
                f"({len(req.generated)} already streamed)",
            )
        logprobs = _token_logprobs(msg, len(tokens)) if req.sampling.logprobs >= 0 else ()
        req.generated.extend(tokens)
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
            if self.s.metrics is not None:
                self.s.metrics.observe_ttft(req.first_token_at - req.submitted_at)
        req.stream._push(StreamEvent(tokens, logprobs=logprobs))

    def _prompt_logprobs(self, worker: WorkerState, msg: PromptLogprobs) -> None:
        req = self._owned(worker, msg.request_id)
        if req.sampling.prompt_logprobs < 0 or req.prompt_scored or req.generated:
            raise BadMessage(ErrorCode.MALFORMED, "prompt logprobs were not asked for or already sent")
        entries = _logprob_entries(
            msg.logprobs, msg.top_ids, msg.top_logprobs, len(req.prompt) - 1, req.sampling.prompt_logprobs
        )
        req.prompt_scored = True
        if not req.aborted:
            req.stream._push(StreamEvent([], prompt_logprobs=entries))

    def _finished(self, worker: WorkerState, msg: Finished) -> None:
        req = self._owned(worker, msg.request_id)
        if msg.tokens or msg.page_ids:
            try:
                self._checked_commit(req, msg.tokens, msg.page_ids)
            except BadMessage as exc:
                # The streamed tokens are good; only the final pages are refused (not shared).
                self.s.link.reply_error(
                    worker.identity, exc.code, f"final commit refused: {exc}", msg.request_id
                )
        if msg.reason is FinishReason.ABORT and not req.aborted:
            # The worker gave up a request nobody aborted (an error on its side): that is the worker's
            # failure, not the client's answer. Resume it elsewhere (bounded by max_attempts).
            self.s.redispatch(req, f"worker {worker.worker_id} gave it up")
            return
        self.s.finish(req, msg.reason, msg.stop_text)


def _token_logprobs(msg: Generated, num_tokens: int) -> tuple[LogprobEntry, ...]:
    """The frame's logprobs, one entry per token; BadMessage when the arrays do not fit the tokens."""
    k, rest = divmod(len(msg.top_ids), 4 * num_tokens)
    if rest:
        raise BadMessage(
            ErrorCode.MALFORMED, f"logprobs of {num_tokens} tokens do not fit the frame's arrays"
        )
    return _logprob_entries(msg.logprobs, msg.top_ids, msg.top_logprobs, num_tokens, k)


def _logprob_entries(
    logprobs: bytes, top_ids: bytes, top_logprobs: bytes, count: int, k: int
) -> tuple[LogprobEntry, ...]:
    """`count` entries of (float32 log-probability, k int32 ids, k float32 values) from a frame's arrays;
    BadMessage when their sizes do not say exactly that."""
    if len(logprobs) != 4 * count or len(top_ids) != 4 * count * k or len(top_logprobs) != len(top_ids):
        raise BadMessage(ErrorCode.MALFORMED, f"logprobs of {count} tokens do not fit the frame's arrays")
    values = np.frombuffer(logprobs, "<f4").tolist()
    ids = np.frombuffer(top_ids, "<i4").reshape(count, k).tolist()
    top_values = np.frombuffer(top_logprobs, "<f4").reshape(count, k).tolist()
    return tuple(zip(values, ids, top_values, strict=True))
