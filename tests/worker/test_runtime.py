"""The worker runtime against a scripted daemon (a real ROUTER socket): registration, heartbeats,
streaming, daemon restart (reconnect + new pool), Shutdown."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from computeworker.config import WorkerConfig
from computeworker.engine.structured import StructuredDecoding
from computeworker.model_info import ModelInfo
from computeworker.runtime import WorkerRuntime
from shared.grammar import xgrammar
from shared.ids import bytes_to_ids, ids_to_bytes
from shared.kv_layout import KVLayout
from shared.pool import OwnedPool, create_pool
from shared.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Codec,
    Dispatch,
    Finished,
    FinishReason,
    Generated,
    Heartbeat,
    Register,
    SamplingParams,
    Shutdown,
    StructuredOutput,
    Welcome,
    WorkerError,
    WorkerToDaemon,
)

from .conftest import CountingModel, LetterTokenizer

LAYOUT = KVLayout(num_layers=2, num_pages=16, page_size=4, num_kv_heads=1, head_dim=8)
INFO = ModelInfo("tiny", 2, 1, 8, context_len=64, eos_token_ids=(63,), dtype="float32")


class ScriptedDaemon:
    """A ROUTER that the test drives by hand."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, generation: int) -> None:
        self.codec = Codec()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.pool: OwnedPool = create_pool(
            LAYOUT, "shm", name=f"wrt-{os.getpid()}-{uuid.uuid4().hex[:8]}", generation=generation
        )
        self.identity = b""

    async def recv(self, skip_heartbeats: bool = True) -> WorkerToDaemon:
        while True:
            identity, data = await asyncio.wait_for(self.sock.recv_multipart(), 10)
            msg = self.codec.decode_from_worker(data)
            if not (skip_heartbeats and isinstance(msg, Heartbeat)):
                self.identity = identity
                return msg

    async def send(self, msg: object) -> None:
        await self.sock.send_multipart([self.identity, self.codec.encode(msg)])  # type: ignore[arg-type]

    async def welcome(self) -> Register:
        reg = await self.recv()
        assert isinstance(reg, Register)
        await self.send(Welcome(PROTOCOL_VERSION, 7, self.pool.descriptor(), "tiny", 0.05, 2))
        return reg

    async def run_request(self, rid: bytes) -> tuple[list[int], Finished]:
        sampling = SamplingParams(temperature=0.0, max_tokens=3)
        await self.send(Dispatch(rid, ids_to_bytes([1, 2, 3]), 0, b"", ids_to_bytes([1, 2]), sampling))
        out: list[int] = []
        while True:
            msg = await self.recv()
            if isinstance(msg, Generated):
                out += bytes_to_ids(msg.tokens).tolist()
            elif isinstance(msg, Finished):
                return out, msg

    def close(self) -> None:
        self.sock.close(linger=0)
        self.pool.close()


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.term()


async def test_register_stream_reconnect_after_daemon_restart_and_shutdown(ctx: zmq.asyncio.Context) -> None:
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='wrt')}/w.sock"
    config = WorkerConfig(
        endpoint, welcome_timeout_s=0.3, reconnect_min_s=0.05, reconnect_max_s=0.2, max_running=3
    )
    runtime = WorkerRuntime(config, CountingModel(), lambda page_size: object(), LetterTokenizer(), INFO)  # type: ignore[arg-type]
    daemon = ScriptedDaemon(ctx, endpoint, generation=1)
    task = asyncio.ensure_future(runtime.run())
    try:
        reg = await daemon.welcome()
        assert (reg.protocol_version, reg.pid, reg.device, reg.max_running, reg.model) == (
            PROTOCOL_VERSION,
            os.getpid(),
            "cpu",
            3,
            "tiny",
        )
        assert reg.ready is False  # registered before warming up; a heartbeat says when it is ready
        beat = await daemon.recv(skip_heartbeats=False)
        while isinstance(beat, Heartbeat) and not beat.ready:  # beats while the engine is made
            assert beat == Heartbeat(0, 0, 0, ready=False)
            beat = await daemon.recv(skip_heartbeats=False)
        assert beat == Heartbeat(0, 0, 0, ready=True)
        tokens, fin = await daemon.run_request(b"a" * 16)
        assert tokens == [4, 5, 6]
        assert (fin.reason, bytes_to_ids(fin.tokens).tolist(), bytes_to_ids(fin.page_ids).tolist()) == (
            FinishReason.LENGTH,
            [1, 2, 3, 4],
            [1],
        )

        daemon.close()  # the daemon dies; a new one comes up with a new pool
        daemon = ScriptedDaemon(ctx, endpoint, generation=2)
        await daemon.welcome()
        tokens, fin = await daemon.run_request(b"b" * 16)
        assert tokens == [4, 5, 6]
        assert runtime.num_sessions == 2

        await daemon.send(Shutdown("bye"))
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        runtime.request_stop()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        daemon.close()


async def test_requests_keep_stepping_while_a_grammar_compiles(ctx: zmq.asyncio.Context) -> None:
    """The first structured request loads the grammar engine (here a slow 1 s): its Dispatch is held
    while that runs on a thread, a free request dispatched after it streams and finishes meanwhile, an
    Abort drops a held Dispatch, and a spec that does not compile is refused with a WorkerError."""
    letters = [chr(ord("a") + i % 26) for i in range(63)] + ["</s>"]

    def slow_engine_load() -> object:
        time.sleep(1.0)
        return xgrammar().TokenizerInfo(letters, vocab_size=64, stop_token_ids=[63])

    endpoint = f"ipc://{tempfile.mkdtemp(prefix='wrt')}/w.sock"
    structured = StructuredDecoding(slow_engine_load, 64, [63])
    runtime = WorkerRuntime(
        WorkerConfig(endpoint, welcome_timeout_s=0.3, max_running=4),
        CountingModel(),  # type: ignore[arg-type]
        lambda page_size: object(),  # type: ignore[arg-type]
        LetterTokenizer(),  # type: ignore[arg-type]
        INFO,
        structured=structured,
    )
    daemon = ScriptedDaemon(ctx, endpoint, generation=1)
    task = asyncio.ensure_future(runtime.run())

    def dispatch(rid: bytes, pages: list[int], spec: StructuredOutput | None) -> Dispatch:
        sampling = SamplingParams(temperature=0.0, max_tokens=8, structured=spec)
        return Dispatch(rid, ids_to_bytes([0]), 0, b"", ids_to_bytes(pages), sampling)

    try:
        await daemon.welcome()
        regex = StructuredOutput("regex", "b[cd]{3}z")
        await daemon.send(dispatch(b"a" * 16, [1, 2, 3], regex))
        await daemon.send(Abort(b"a" * 16))  # dropped while held
        await daemon.send(dispatch(b"s" * 16, [4, 5, 6], regex))
        await daemon.send(dispatch(b"f" * 16, [7, 8, 9], None))
        await daemon.send(dispatch(b"x" * 16, [10, 11, 12], StructuredOutput("regex", "(b")))
        order: list[tuple[bytes, str]] = []
        outputs: dict[bytes, list[int]] = {}
        while len([kind for _, kind in order if kind in ("finished", "error")]) < 3:
            msg = await daemon.recv()
            if isinstance(msg, Generated):
                outputs.setdefault(msg.request_id, []).extend(bytes_to_ids(msg.tokens).tolist())
                order.append((msg.request_id, "generated"))
            elif isinstance(msg, Finished):
                order.append((msg.request_id, "finished"))
            elif isinstance(msg, WorkerError):
                assert "invalid regex" in msg.message
                order.append((msg.request_id, "error"))
        assert (b"f" * 16, "finished") in order and order.index((b"f" * 16, "finished")) < order.index(
            (b"s" * 16, "generated")
        )  # the free request did not wait for the grammar engine
        assert outputs[b"f" * 16] == list(range(1, 9)) and outputs[b"s" * 16] == [1, 2, 3, 2, 25]
        assert b"a" * 16 not in outputs and (b"x" * 16, "error") in order
    finally:
        runtime.request_stop()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        daemon.close()
