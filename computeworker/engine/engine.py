"""The continuous-batching engine of one worker: requests in, forward passes, wire messages out.

Threading: every method runs on one thread at a time. The worker runtime calls the event methods
(`add`, `abort`, `on_commit_ack`, ...) and `step` from its driver, never concurrently; `step` is the only
one that touches the model or the pool, and it may run on a compute thread while the event loop only
reads the counters. Messages for the daemon accumulate in an outbox that `take_messages` empties, in the
order they must be sent (for a request: Generated frames, Commit, PageRequest, ..., Finished last).

Page ownership follows the Dispatch contract (shared.protocol): prefix pages are read-only; the prompt's
new full pages are committed once their K/V is written (after the step that wrote them returned), and the
request stays out of the batch until the CommitAck says which pages back them (the daemon frees
duplicates, which another request may then overwrite). Finished carries every written full page.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from computeworker.engine.dispatch import check_page_ids, request_from_dispatch
from computeworker.engine.fences import Fence, StepStats
from computeworker.engine.prompt_scoring import prompt_logprobs_frame, score_and_keep_last_rows
from computeworker.engine.request import Phase, Request
from computeworker.engine.sampling import TokenLogprobs
from computeworker.engine.scheduler import build_batch, plan_step, scoring_chunks
from computeworker.engine.stop import DetokenizerSource
from computeworker.engine.structured import StructuredDecoding
from computeworker.engine.token_choice import choose_tokens, generated_frame
from computeworker.model.batch import AttentionBackend, ForwardBatch
from shared.ids import bytes_to_ids
from shared.protocol import (
    Commit,
    CommitAck,
    Dispatch,
    ErrorCode,
    ErrorReply,
    Finished,
    FinishReason,
    PageRequest,
    PagesGranted,
    WorkerToDaemon,
)


class PagedModel(Protocol):
    def forward(
        self,
        batch: ForwardBatch,
        kv_pool: torch.Tensor,
        attention: AttentionBackend,
        all_logits: bool = False,
    ) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class EngineConfig:
    page_size: int
    context_len: int  # the model's maximum positions
    eos_token_ids: tuple[int, ...] = ()
    max_running: int = 16
    prefill_chunk: int = 512
    mixed_steps: bool = True  # decodes and prefill chunks in one step; False: separate steps (see plan_step)
    decode_page_chunk: int = 4
    stream_max_tokens: int = 4  # flush a Generated frame at this many tokens ...
    stream_interval_s: float = 0.02  # ... or when the oldest unsent token is this old

    def __post_init__(self) -> None:
        for name in ("page_size", "context_len", "max_running", "prefill_chunk", "decode_page_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.stream_max_tokens < 1 or self.stream_interval_s < 0:
            raise ValueError("stream_max_tokens must be >= 1 and stream_interval_s >= 0")


class Engine:
    def __init__(
        self,
        model: PagedModel,
        attention: AttentionBackend,
        pool: torch.Tensor,
        tokenizer: DetokenizerSource,
        config: EngineConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        make_fence: Callable[[], Fence] | None = None,
        on_step: Callable[[StepStats], None] | None = None,
        structured: StructuredDecoding | None = None,
    ) -> None:
        """make_fence: records a fence after each forward pass (CUDA: an event); Commit and Finished
        wait in the outbox until it completes (see computeworker.engine.fences). on_step: called with
        each step's StepStats on the compute thread. structured: the grammar engine for requests with a
        structured output (None: such dispatches are refused)."""
        if pool.dim() != 6 or pool.shape[3] != config.page_size:
            raise ValueError(f"pool shape {tuple(pool.shape)} does not match page_size {config.page_size}")
        self._model = model
        self._attention = attention
        self._pool = pool
        self._tokenizer = tokenizer
        self.config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._running: dict[bytes, Request] = {}
        self._waiting: deque[Request] = deque()
        self._outbox: list[tuple[WorkerToDaemon, Fence | None]] = []
        self._make_fence = make_fence
        self._on_step = on_step
        if structured is not None and not set(structured.stop_token_ids) <= set(config.eos_token_ids):
            # A complete grammar allows only its stop tokens: each must end the request here.
            raise ValueError(
                f"the grammar's stop tokens {structured.stop_token_ids} are not all EOS ids of the engine"
            )
        self._structured = structured
        self._last_fence: Fence | None = None  # recorded after the latest forward pass
        self.steps_done = 0  # forward passes completed (Heartbeat.steps_done)
        self._last_step_prefilled = False

    # ------------------------------------------------------------------ counters (any thread may read)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_tokens_in_use(self) -> int:
        return sum(r.num_computed for r in list(self._running.values()))

    def has_work(self) -> bool:
        """Whether `step` would run a forward pass now."""
        return any(r.can_step() for r in self._running.values())

    def get(self, request_id: bytes) -> Request | None:
        return self._running.get(request_id) or next(
            (r for r in self._waiting if r.request_id == request_id), None
        )

    # ------------------------------------------------------------------ events from the daemon

    def add(self, msg: Dispatch) -> None:
        """Accept a dispatched request (queued if max_running are running). Raises ValueError, changing
        nothing, if the dispatch is inconsistent (page counts, ids outside the pool, duplicate id)."""
        req = self._make_request(msg)
        if req.finish_reason is None and req.num_free_slots == 0 and req.pages_still_needed() == 0:
            raise ValueError("dispatch leaves no page for the prompt")
        self._waiting.append(req)
        self._admit()

    def abort(self, request_id: bytes) -> bool:
        """Drop a request and its state; nothing is sent (the daemon releases the lease)."""
        if self._running.pop(request_id, None) is not None:
            self._admit()
            return True
        for req in self._waiting:
            if req.request_id == request_id:
                self._waiting.remove(req)
                return True
        return False

    def on_commit_ack(self, msg: CommitAck) -> None:
        """Switch the committed prompt pages to the ids the tree now holds. Raises ValueError if the ack
        does not match a commit in flight."""
        req = self._running.get(msg.request_id)
        page_ids = bytes_to_ids(msg.page_ids)
        if req is None or req.phase is not Phase.AWAIT_COMMIT or len(page_ids) != req.num_committed_pages:
            raise ValueError(f"unexpected CommitAck for {msg.request_id.hex()}")
        check_page_ids(page_ids, self._pool.shape[1])
        req.page_table[: len(page_ids)] = page_ids
        req.phase = Phase.RUNNING
        self._service(req)

    def on_pages_granted(self, msg: PagesGranted) -> None:
        req = self._running.get(msg.request_id)
        page_ids = bytes_to_ids(msg.page_ids)
        if req is None or not req.pages_requested:
            raise ValueError(f"unexpected PagesGranted for {msg.request_id.hex()}")
        check_page_ids(page_ids, self._pool.shape[1])
        req.page_table = np.concatenate([req.page_table, page_ids])
        req.pages_requested = False
        self._service(req)

    def on_error(self, msg: ErrorReply) -> None:
        """A request-level error from the daemon. NO_ROOM: the request finishes (LENGTH) when its pages
        run out. A rejected prompt commit: keep the request's own pages. Anything else: abort it."""
        req = self._running.get(msg.request_id)
        if req is None:
            return
        if msg.code is ErrorCode.NO_ROOM and req.pages_requested:
            req.pages_requested = False
            req.out_of_pages = True
        elif msg.code is ErrorCode.BAD_PAGES and req.phase is Phase.AWAIT_COMMIT:
            req.phase = Phase.RUNNING
        else:
            req.finish(FinishReason.ABORT)
        self._service(req)

    def reset(self) -> int:
        """Forget every request (the daemon that dispatched them is gone). Returns how many."""
        count = len(self._running) + len(self._waiting)
        self._running.clear()
        self._waiting.clear()
        self._outbox.clear()
        return count

    def fail_all(self) -> None:
        """Finish every running request with ABORT (a step failed: their pages may hold garbage, so
        nothing is committed)."""
        for req in list(self._running.values()):
            req.finish(FinishReason.ABORT)
            self._service(req)

    def take_messages(self) -> list[WorkerToDaemon]:
        """The messages to send now, in order: the outbox up to the first one whose fence has not
        completed (that one and the rest stay; see `pending_fence`)."""
        num_ready = 0
        for _, fence in self._outbox:
            if fence is not None and not fence.query():
                break
            num_ready += 1
        out = [msg for msg, _ in self._outbox[:num_ready]]
        del self._outbox[:num_ready]
        return out

    def pending_fence(self) -> Fence | None:
        """The fence holding back the outbox, or None if take_messages would empty it."""
        return next((f for _, f in self._outbox if f is not None and not f.query()), None)

    # ------------------------------------------------------------------ compute

    @torch.inference_mode()
    def step(self) -> int:
        """Run one forward pass over the scheduled work, sample, and queue the resulting messages.
        Returns the number of tokens computed (0 when nothing could run)."""
        entries = plan_step(
            list(self._running.values()),
            self.config.prefill_chunk,
            mixed=self.config.mixed_steps,
            after_prefill=self._last_step_prefilled,
        )
        if not entries:
            return 0
        for entry in entries:
            req = entry.request
            if req.cow_source is not None:
                private = req.page_table[req.num_computed // self.config.page_size]
                self._pool[:, private].copy_(self._pool[:, req.cow_source])
                req.cow_source = None
        start = time.perf_counter()
        num_prefill = sum(e.num_tokens for e in entries if e.request.is_prefilling)
        self._last_step_prefilled = num_prefill > 0
        batch = build_batch(entries, self.config.page_size, self._pool.device)
        built = time.perf_counter()
        scoring = scoring_chunks(entries)
        logits = self._model.forward(batch, self._pool, self._attention, all_logits=bool(scoring))
        issued = time.perf_counter()
        if self._make_fence is not None:
            self._last_fence = self._make_fence()
        if scoring:
            logits = score_and_keep_last_rows(logits, scoring, batch.q_lens)
        sampling_rows = [i for i, e in enumerate(entries) if e.samples]
        if len(sampling_rows) < len(entries):  # some rows end mid-prompt (chunked prefill)
            logits = logits[sampling_rows]
        sampling_reqs = [entries[i].request for i in sampling_rows]
        choices = choose_tokens(logits, sampling_reqs, self.config.eos_token_ids, self._structured)
        sampled_at = time.perf_counter()
        sampled = dict(zip(sampling_rows, zip(choices.tokens, choices.logprobs, strict=True), strict=True))
        for i, entry in enumerate(entries):
            req = entry.request
            req.num_computed += entry.num_tokens
            if i not in sampled:
                continue
            if req.grammar is not None:
                req.grammar.pending = sampled[i][0]  # fed to the matcher at the next step's mask
                if req.request_id in choices.stuck:
                    req.finish(FinishReason.STOP)
                    continue
            self._accept_token(req, *sampled[i])
        self.steps_done += 1  # read by the heartbeat (another thread): progress for the daemon's watchdog
        if self._on_step is not None:
            self._on_step(
                StepStats(
                    num_seqs=len(entries),
                    num_tokens=batch.num_tokens,
                    num_prefill_tokens=num_prefill,
                    num_cached_tokens=sum(kv - q for q, kv in zip(batch.q_lens, batch.kv_lens, strict=True)),
                    seconds=time.perf_counter() - start,
                    build_s=built - start,
                    forward_s=issued - built,
                    sample_s=sampled_at - issued,
                )
            )
        for req in list(self._running.values()):
            self._service(req)
        return batch.num_tokens

    # ------------------------------------------------------------------ internals

    def _make_request(self, msg: Dispatch) -> Request:
        if self.get(msg.request_id) is not None:
            raise ValueError(f"request {msg.request_id.hex()} is already here")
        seed = msg.sampling.seed if msg.sampling.seed is not None else self._rng.getrandbits(63)
        return request_from_dispatch(
            msg,
            self.config.page_size,
            self.config.context_len,
            self._pool.shape[1],
            seed,
            self._tokenizer,
            self._structured,
        )

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.config.max_running:
            req = self._waiting.popleft()
            self._running[req.request_id] = req
            self._service(req)

    def _accept_token(self, req: Request, token: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record a sampled token (and its logprobs, when the request asked) and decide whether the
        request finishes."""
        prompt_done_now = req.num_output == 0
        params = req.sampling
        if prompt_done_now and params.prompt_logprobs >= 0:
            self._outbox.append((prompt_logprobs_frame(req, req.prompt_scores), None))
            req.prompt_scores.clear()
        is_eos = token in self.config.eos_token_ids and not params.ignore_eos
        if is_eos or token in params.stop_token_ids:
            req.finish(FinishReason.STOP)  # the stop token itself is not part of the output
        else:
            req.output.append(token)
            if logprobs is not None:
                req.output_logprobs.append(logprobs)
            stop = req.stop_matcher.push(token) if req.stop_matcher is not None else None
            if stop is not None:
                req.finish(FinishReason.STOP, stop)
            elif req.num_tokens >= req.max_len:
                req.finish(FinishReason.LENGTH)
        self._flush(req, force=prompt_done_now or req.is_finished)
        if prompt_done_now:
            commit = req.prompt_commit()
            if commit is not None:
                msg = Commit(req.request_id, commit.tokens, commit.page_ids)
                self._outbox.append((msg, self._last_fence))
                req.phase = Phase.AWAIT_COMMIT
                req.num_committed_pages = commit.num_pages

    def _flush(self, req: Request, *, force: bool) -> None:
        pending = req.num_output - req.num_emitted
        if pending <= 0:
            return
        now = self._clock()
        if (
            force
            or pending >= self.config.stream_max_tokens
            or now - req.last_flush_s >= self.config.stream_interval_s
        ):
            out = req.output[req.num_emitted :]
            self._outbox.append((generated_frame(req, out), None))
            req.num_emitted = req.num_output
            req.last_flush_s = now

    def _service(self, req: Request) -> None:
        """Send what the request's state calls for: pages ahead of need, Finished when done."""
        ps = self.config.page_size
        if not req.is_finished and req.out_of_pages and req.num_free_slots == 0:
            req.finish(FinishReason.LENGTH)
        reason = req.finish_reason
        if reason is not None:
            if req.phase is Phase.AWAIT_COMMIT and reason is not FinishReason.ABORT:
                return  # Finished must name the pages the CommitAck settles
            self._flush(req, force=True)
            final = req.final_commit() if reason is not FinishReason.ABORT else None
            tokens, pages = (
                (final.tokens, final.page_ids) if final is not None and final.num_pages else (b"", b"")
            )
            finished = Finished(req.request_id, reason, tokens, pages, req.stop_text)
            self._outbox.append((finished, self._last_fence if pages else None))
            self._running.pop(req.request_id, None)
            self._admit()
            return
        if req.pages_requested or req.out_of_pages:
            return
        # Ask one page ahead of need so decoding rarely waits for the round trip.
        shortfall = req.num_pending_tokens + ps - req.num_free_slots
        needed = req.pages_still_needed()
        if shortfall > 0 and needed > 0:
            num_pages = min(needed, max(self.config.decode_page_chunk, -(-shortfall // ps)))
            self._outbox.append((PageRequest(req.request_id, num_pages), None))
            req.pages_requested = True
