"""The worker process's event loop: registration, heartbeats, message routing and the compute driver.

    reader task ──► inbox ──► driver task ──► compute thread: engine.step()
        ▲                         │                (the loop keeps serving I/O meanwhile)
        │                         ▼
    DaemonLink ◄──────── engine.take_messages()        heartbeat task (never waits on compute)

A *session* is one registration. It ends when the daemon goes away (socket monitor sees a disconnect,
or the daemon answers NOT_REGISTERED); the worker then forgets its requests (their leases died with the
daemon), registers again with exponential backoff, and maps the new pool if the descriptor changed.
Shutdown from the daemon, or `request_stop()` (signals), ends the worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import time
from collections.abc import Callable

import torch
import zmq.asyncio

from computeworker.client import DaemonLink
from computeworker.config import WorkerConfig
from computeworker.engine.engine import Engine, EngineConfig, PagedModel
from computeworker.engine.fences import Fence, StepStats
from computeworker.engine.stop import DetokenizerSource
from computeworker.engine.structured import StructuredDecoding
from computeworker.grammar_compiles import GrammarCompiles
from computeworker.model.batch import AttentionBackend
from computeworker.model_info import ModelInfo
from shared.pool import MappedPool, map_pool
from shared.process_identity import pid_namespace_id
from shared.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Codec,
    CommitAck,
    DaemonToWorker,
    Dispatch,
    ErrorCode,
    ErrorReply,
    Goodbye,
    Heartbeat,
    PagesGranted,
    PoolDescriptor,
    Register,
    Shutdown,
    Welcome,
    WorkerError,
)

log = logging.getLogger(__name__)


class SessionEnded(Exception):
    """The daemon went away (or forgot us): register again."""


class WorkerRuntime:
    """Runs until the daemon says Shutdown or `request_stop` is called. One per process."""

    def __init__(
        self,
        config: WorkerConfig,
        model: PagedModel,
        make_attention: Callable[[int], AttentionBackend],
        tokenizer: DetokenizerSource,
        info: ModelInfo,
        *,
        pool_mapper: Callable[[PoolDescriptor], MappedPool] = map_pool,
        on_pool: Callable[[torch.Tensor, AttentionBackend], object] | None = None,
        make_fence: Callable[[], Fence] | None = None,
        on_step: Callable[[StepStats], None] | None = None,
        structured: StructuredDecoding | None = None,
    ) -> None:
        """on_pool(pool tensor, attention): called on the compute thread after each new pool mapping or
        attention backend, before the session serves (CUDA: warm kernels, capture graphs).
        make_fence: handed to every Engine (see computeworker.engine.fences). on_step: called on the
        event loop with each step's StepStats once the step's messages are sent (a log line must not
        delay the first token). At DEBUG level each step also logs a `trace` line: where the time
        between a Dispatch arriving and its messages leaving went. structured: the grammar engine for
        structured output (None: such requests are refused)."""
        self._config = config
        self._model = model
        self._make_attention = make_attention  # page_size -> backend (FlashInfer plans need it)
        self._attention: tuple[int, AttentionBackend] | None = None
        self._tokenizer = tokenizer
        self._info = info
        self._map_pool = pool_mapper
        self._on_pool = on_pool
        self._make_fence = make_fence
        self._on_step = on_step
        self._structured = structured
        self._compiles = GrammarCompiles(structured)  # this session's Dispatches held while compiling
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compute")
        self._inflight: concurrent.futures.Future[int] | None = None
        self._step_stats: list[StepStats] = []  # appended on the compute thread, drained on the loop
        self._dispatch_at: float | None = None  # perf_counter of the latest Dispatch read (trace only)
        self._pool: MappedPool | None = None
        self._pool_desc: PoolDescriptor | None = None
        self._codec = Codec()
        self._stop = asyncio.Event()
        self._shutdown_by_daemon = False
        self.num_sessions = 0  # registrations so far (tests watch reconnects)

    def request_stop(self) -> None:
        """Leave after the current step: Goodbye to the daemon, release everything."""
        self._stop.set()

    async def run(self) -> int:
        """Serve sessions until stopped. Returns the process exit code."""
        ctx = zmq.asyncio.Context()
        try:
            backoff = self._config.reconnect_min_s
            while not self._stop.is_set():
                link = DaemonLink(ctx, self._config.daemon_endpoint, self._codec)
                try:
                    welcome = await self._register(link)
                    if welcome is None:
                        await self._sleep(backoff)
                        backoff = min(backoff * 2, self._config.reconnect_max_s)
                        continue
                    backoff = self._config.reconnect_min_s
                    await self._serve(link, welcome)
                finally:
                    link.close()
            return 0
        finally:
            await self._wait_compute()
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            self._executor.shutdown(wait=True)
            ctx.term()

    # ------------------------------------------------------------------ one session

    async def _register(self, link: DaemonLink) -> Welcome | None:
        msg = Register(
            protocol_version=PROTOCOL_VERSION,
            pid=os.getpid(),
            pid_namespace=pid_namespace_id(),
            device=self._config.device,
            max_running=self._config.max_running,
            model=self._info.name,
            name=self._config.name,
            ready=False,  # the first Heartbeat after warm-up says ready (_serve)
        )
        welcome = await link.register(msg, self._config.welcome_timeout_s)
        if welcome is not None:
            log.info(
                "registered as worker %d (pool generation %d)", welcome.worker_id, welcome.pool.generation
            )
        return welcome

    async def _serve(self, link: DaemonLink, welcome: Welcome) -> None:
        self.num_sessions += 1
        # Mapping the pool and warming kernels can outlast the heartbeat timeout: keep beating meanwhile.
        beating = asyncio.ensure_future(self._heartbeat(link, None, welcome.heartbeat_interval_s))
        try:
            engine = await self._make_engine(welcome)
        finally:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
        inbox: list[DaemonToWorker] = []
        wakeup = asyncio.Event()
        tasks = [
            asyncio.ensure_future(self._read(link, inbox, wakeup)),
            asyncio.ensure_future(self._heartbeat(link, engine, welcome.heartbeat_interval_s)),
            asyncio.ensure_future(self._drive(link, engine, inbox, wakeup)),
            asyncio.ensure_future(link.disconnected.wait()),
            asyncio.ensure_future(self._stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and isinstance(task.exception(), Exception):
                    exc = task.exception()
                    if not isinstance(exc, SessionEnded):
                        raise exc  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._wait_compute()
            dropped = engine.reset() + self._compiles.clear()
            if dropped:
                log.warning("dropped %d requests with the session", dropped)
        if self._stop.is_set() and not self._shutdown_by_daemon and not link.disconnected.is_set():
            await link.send(Goodbye("worker stopping"))

    async def _make_engine(self, welcome: Welcome) -> Engine:
        desc = welcome.pool
        info = self._info
        if (desc.num_layers, desc.num_kv_heads, desc.head_dim) != (
            info.num_layers,
            info.num_kv_heads,
            info.head_dim,
        ):
            raise RuntimeError(
                f"pool layout (layers {desc.num_layers}, kv heads {desc.num_kv_heads}, head dim "
                f"{desc.head_dim}) does not fit model {info.name}"
            )
        if desc.dtype != info.dtype:
            raise RuntimeError(
                f"pool dtype {desc.dtype} differs from the worker's {info.dtype}: pass --dtype {desc.dtype}"
            )
        bound = True
        if self._attention is None or self._attention[0] != desc.page_size:
            self._attention = (desc.page_size, self._make_attention(desc.page_size))
            bound = False
        if desc != self._pool_desc:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            self._pool = self._map_pool(desc)
            self._pool_desc = desc
            bound = False
        pool = self._pool
        assert pool is not None  # mapped above whenever the descriptor changed
        if not bound and self._on_pool is not None:
            # Warm-up takes seconds: run it where steps run, so heartbeats keep flowing meanwhile.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._on_pool, pool.tensor, self._attention[1])
        config = EngineConfig(
            page_size=desc.page_size,
            context_len=info.context_len,
            eos_token_ids=info.eos_token_ids,
            max_running=self._config.max_running,
            prefill_chunk=self._config.prefill_chunk,
            mixed_steps=self._config.resolved_mixed_steps,
            decode_page_chunk=welcome.decode_page_chunk,
            stream_max_tokens=self._config.stream_max_tokens,
            stream_interval_s=self._config.stream_interval_s,
        )
        return Engine(
            self._model,
            self._attention[1],
            pool.tensor,
            self._tokenizer,
            config,
            rng=random.Random(),
            make_fence=self._make_fence,
            on_step=self._step_stats.append,
            structured=self._structured,
        )

    async def _read(self, link: DaemonLink, inbox: list[DaemonToWorker], wakeup: asyncio.Event) -> None:
        while True:
            msg = await link.recv()
            if msg is None:
                continue
            if isinstance(msg, Shutdown):
                log.info("daemon asked to shut down: %s", msg.reason)
                self._shutdown_by_daemon = True
                self._stop.set()
                return
            if isinstance(msg, ErrorReply) and not msg.request_id:
                if msg.code is ErrorCode.NOT_REGISTERED:
                    raise SessionEnded("the daemon does not know this worker")
                if msg.code is ErrorCode.BAD_VERSION:
                    raise RuntimeError(f"daemon rejected the protocol version: {msg.message}")
                log.error("daemon error %s: %s", msg.code.value, msg.message)
                continue
            if isinstance(msg, Welcome):
                log.warning("ignoring an unexpected Welcome")
                continue
            if isinstance(msg, Dispatch):
                self._dispatch_at = time.perf_counter()
            inbox.append(msg)
            wakeup.set()

    async def _heartbeat(self, link: DaemonLink, engine: Engine | None, interval_s: float) -> None:
        while True:
            if engine is None:  # still starting: nothing running, no request to be sent here yet
                await link.send(Heartbeat(0, 0, 0, ready=False))
            else:
                await link.send(
                    Heartbeat(
                        engine.num_running, engine.num_waiting, engine.kv_tokens_in_use, engine.steps_done
                    )
                )
            await asyncio.sleep(interval_s)

    async def _drive(
        self, link: DaemonLink, engine: Engine, inbox: list[DaemonToWorker], wakeup: asyncio.Event
    ) -> None:
        """Alternate between applying daemon messages and running steps on the compute thread; the
        engine is never touched by both at once. A step's messages leave before the next step starts:
        sending them while it runs was measured slower (run 16: the loop's sends and the step's batch
        build contend for the GIL, and decode steps took 1.5-3.4 ms to build instead of 1.5)."""
        while True:
            await self._add_compiled(link, engine, wakeup)
            pending, inbox[:] = list(inbox), []
            for msg in pending:
                await self._apply(link, engine, msg, wakeup)
            for out in engine.take_messages():
                await link.send(out)
            if engine.has_work():
                submitted = time.perf_counter()
                self._inflight = self._executor.submit(engine.step)
                try:
                    await asyncio.wrap_future(self._inflight)
                except Exception:
                    log.exception("a step failed: aborting every running request")
                    engine.fail_all()
                returned = time.perf_counter()
                for out in engine.take_messages():
                    await link.send(out)
                self._report_steps(submitted, returned)
            elif (fence := engine.pending_fence()) is not None:
                # Commits wait for the kernels that wrote their pages; wait off the loop and the
                # compute thread.
                await asyncio.get_running_loop().run_in_executor(None, fence.synchronize)
            elif not inbox:
                wakeup.clear()
                await wakeup.wait()

    def _report_steps(self, submitted: float, returned: float) -> None:
        """Hand the finished step's stats to on_step and, at DEBUG, log its trace: dispatch (the latest
        Dispatch read -> step submitted), the step's own phases, handoff (loop -> compute thread -> loop,
        beyond the step's own time) and send (step returned -> its messages handed to ZeroMQ)."""
        sent = time.perf_counter()
        stats, self._step_stats[:] = list(self._step_stats), []
        for st in stats:
            if self._on_step is not None:
                self._on_step(st)
            if log.isEnabledFor(logging.DEBUG):
                dispatch_at, self._dispatch_at = self._dispatch_at, None
                log.debug(
                    "trace tokens=%d cached=%d dispatch_ms=%.3f step_ms=%.3f build_ms=%.3f forward_ms=%.3f "
                    "sample_ms=%.3f handoff_ms=%.3f send_ms=%.3f",
                    st.num_tokens,
                    st.num_cached_tokens,
                    (submitted - dispatch_at) * 1e3 if dispatch_at is not None else -1.0,
                    st.seconds * 1e3,
                    st.build_s * 1e3,
                    st.forward_s * 1e3,
                    st.sample_s * 1e3,
                    (returned - submitted - st.seconds) * 1e3,
                    (sent - returned) * 1e3,
                )

    async def _apply(
        self, link: DaemonLink, engine: Engine, msg: DaemonToWorker, wakeup: asyncio.Event
    ) -> None:
        try:
            if isinstance(msg, Dispatch):
                if not self._compiles.hold(msg, wakeup):  # held while its grammar compiles
                    engine.add(msg)
            elif isinstance(msg, Abort):
                if not self._compiles.drop(msg.request_id):
                    engine.abort(msg.request_id)
            elif isinstance(msg, CommitAck):
                engine.on_commit_ack(msg)
            elif isinstance(msg, PagesGranted):
                engine.on_pages_granted(msg)
            elif isinstance(msg, ErrorReply):
                engine.on_error(msg)
        except ValueError as exc:
            request_id = getattr(msg, "request_id", b"")
            log.error("rejected %s for %s: %s", type(msg).__name__, request_id.hex(), exc)
            if isinstance(msg, Dispatch):
                await link.send(WorkerError(ErrorCode.BAD_PAGES, str(exc), request_id))

    async def _add_compiled(self, link: DaemonLink, engine: Engine, wakeup: asyncio.Event) -> None:
        """Hand the engine the held Dispatches whose grammar is compiled; refuse those that did not
        compile."""
        for msg, error in self._compiles.ready():
            if error is None:
                await self._apply(link, engine, msg, wakeup)
            else:
                log.error("rejected Dispatch for %s: %s", msg.request_id.hex(), error)
                await link.send(WorkerError(ErrorCode.BAD_PAGES, str(error), msg.request_id))

    async def _wait_compute(self) -> None:
        """Let a step that is still running finish: the pool must outlive it."""
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            # The step's own error was already handled by the driver; only its end matters here.
            await asyncio.wait([asyncio.wrap_future(inflight)])

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            return
