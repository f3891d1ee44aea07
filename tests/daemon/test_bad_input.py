"""Bad input over a real socket: every case gets a typed ErrorReply, nothing changes, the daemon serves on."""

from __future__ import annotations

import asyncio
import os

import msgspec
import numpy as np
import pytest
import zmq
import zmq.asyncio

from cachemgr.daemon import Daemon
from shared.ids import bytes_to_ids, ids_to_bytes
from shared.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Codec,
    Commit,
    Dispatch,
    ErrorCode,
    ErrorReply,
    Finished,
    FinishReason,
    Heartbeat,
    PageRequest,
    PagesGranted,
    Register,
    SamplingParams,
    Welcome,
)
from tests.daemon.conftest import NS

CODEC = Codec()


class RawWorker:
    """A DEALER socket driven by hand."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def send_raw(self, *frames: bytes) -> None:
        await self.sock.send_multipart(list(frames))

    async def send(self, msg: object) -> None:
        await self.send_raw(CODEC.encode(msg))  # type: ignore[arg-type]

    async def recv(self) -> object:
        return CODEC.decode_from_daemon(await asyncio.wait_for(self.sock.recv(), 5.0))

    async def expect_error(self, code: ErrorCode) -> ErrorReply:
        reply = await self.recv()
        assert isinstance(reply, ErrorReply), reply
        assert reply.code is code, reply
        return reply

    async def register(self) -> Welcome:
        await self.send(
            Register(
                protocol_version=PROTOCOL_VERSION,
                pid=os.getpid(),
                device="cpu",
                max_running=2,
                model="tiny-llama",
            )
        )
        welcome = await self.recv()
        assert isinstance(welcome, Welcome)
        return welcome


@pytest.fixture
async def raw(daemon: Daemon):
    worker = RawWorker(daemon.context, daemon.endpoint)
    yield worker
    worker.sock.close()


def snapshot(daemon: Daemon) -> tuple:
    s = daemon.cache.stats()
    d = daemon.stats()
    return (s.free, s.cached, s.leased, s.num_leases, d["workers"], d["running"], d["queue_depth"])


async def test_unregistered_garbage_and_unknown_tags(daemon: Daemon, raw: RawWorker) -> None:
    before = snapshot(daemon)
    await raw.send_raw(b"\xc1\xc1 not msgpack")
    await raw.expect_error(ErrorCode.MALFORMED)
    await raw.send_raw(msgspec.msgpack.encode({"type": "launch_missiles"}))
    await raw.expect_error(ErrorCode.MALFORMED)
    await raw.send_raw(msgspec.msgpack.encode({"type": "heartbeat", "num_running": "many", "num_waiting": 0}))
    await raw.expect_error(ErrorCode.MALFORMED)
    await raw.send_raw(CODEC.encode(Heartbeat(num_running=0, num_waiting=0)), b"extra frame")
    await raw.expect_error(ErrorCode.MALFORMED)
    await raw.send(Heartbeat(num_running=0, num_waiting=0))
    await raw.expect_error(ErrorCode.NOT_REGISTERED)
    await raw.send(
        Register(protocol_version=PROTOCOL_VERSION + 1, pid=1, device="cpu", max_running=1, model="")
    )
    reply = await raw.expect_error(ErrorCode.BAD_VERSION)
    assert reply.message == f"daemon speaks protocol {PROTOCOL_VERSION}, not {PROTOCOL_VERSION + 1}"
    await raw.send(Register(protocol_version=PROTOCOL_VERSION, pid=1, device="cpu", max_running=0, model=""))
    await raw.expect_error(ErrorCode.MALFORMED)
    assert snapshot(daemon) == before
    assert daemon.stats()["bad_messages"] == 7
    daemon.check()
    welcome = await raw.register()  # still serving
    assert welcome.worker_id == 1 and welcome.pool == daemon.pool


async def test_oversize_frame_is_refused_unread(daemon: Daemon, raw: RawWorker) -> None:
    await raw.register()
    before = snapshot(daemon)
    await raw.send_raw(b"\x00" * (MAX_FRAME_BYTES + 1))
    reply = await raw.expect_error(ErrorCode.TOO_LARGE)
    assert reply.message == f"frame of {MAX_FRAME_BYTES + 1} bytes > {MAX_FRAME_BYTES}"
    # Pages and leases unchanged. (Moving 64 MiB can outlast the 0.6 s heartbeat timeout on a loaded
    # box, and this raw worker sends no heartbeats, so whether it is still registered is not the point.)
    assert snapshot(daemon)[:4] == before[:4]
    daemon.check()


async def test_request_level_misuse_changes_nothing(daemon: Daemon, raw: RawWorker) -> None:
    await raw.register()
    prompt = list(range(100, 110))  # 10 tokens: 2 full pages + 2 tokens
    stream = await daemon.submit(NS, prompt, SamplingParams(max_tokens=3))
    dispatch = await raw.recv()
    assert isinstance(dispatch, Dispatch)
    assert (dispatch.matched_len, bytes_to_ids(dispatch.tokens).tolist()) == (0, prompt)
    new_pages = bytes_to_ids(dispatch.new_page_ids).tolist()
    assert (
        len(new_pages) == 3 + 1
    )  # ceil(13 / 4) pages: the prompt's 3 and min(chunk=2, what 3 tokens need)=1
    rid = dispatch.request_id
    before = snapshot(daemon)
    owned = set(daemon.cache.lease_owned_pages(daemon.leases_info()[0]["lease_id"]).tolist())
    foreign = sorted(set(range(daemon.pool.num_pages)) - owned)[:2]

    cases = [
        (
            Commit(request_id=b"nope", tokens=ids_to_bytes(prompt[:8]), page_ids=ids_to_bytes(new_pages[:2])),
            ErrorCode.UNKNOWN_REQUEST,
        ),
        (
            Commit(request_id=rid, tokens=ids_to_bytes(prompt[:8]), page_ids=ids_to_bytes(foreign)),
            ErrorCode.BAD_PAGES,
        ),
        (
            Commit(request_id=rid, tokens=ids_to_bytes([9] * 8), page_ids=ids_to_bytes(new_pages[:2])),
            ErrorCode.BAD_PAGES,
        ),
        (
            Commit(request_id=rid, tokens=ids_to_bytes(prompt[:6]), page_ids=ids_to_bytes(new_pages[:2])),
            ErrorCode.BAD_PAGES,
        ),
        (Commit(request_id=rid, tokens=b"\x01\x02\x03", page_ids=b""), ErrorCode.MALFORMED),
        (PageRequest(request_id=rid, num_pages=0), ErrorCode.MALFORMED),
        (PageRequest(request_id=b"other", num_pages=1), ErrorCode.UNKNOWN_REQUEST),
        (Finished(request_id=b"other", reason=FinishReason.STOP), ErrorCode.UNKNOWN_REQUEST),
    ]
    for msg, code in cases:
        await raw.send(msg)
        reply = await raw.expect_error(code)
        assert reply.request_id == msg.request_id
        assert snapshot(daemon) == before, msg
        daemon.check()

    # The same worker, well behaved, completes the request.
    await raw.send(
        Commit(request_id=rid, tokens=ids_to_bytes(prompt[:8]), page_ids=ids_to_bytes(new_pages[:2]))
    )
    ack = await raw.recv()
    assert bytes_to_ids(ack.page_ids).tolist() == new_pages[:2]  # type: ignore[attr-defined]
    await raw.send(PageRequest(request_id=rid, num_pages=2))
    granted = await raw.recv()
    assert isinstance(granted, PagesGranted) and len(bytes_to_ids(granted.page_ids)) == 2
    await raw.send(Finished(request_id=rid, reason=FinishReason.LENGTH))
    events = [e async for e in stream]
    assert [(e.token_ids, e.finish_reason) for e in events] == [([], FinishReason.LENGTH)]
    stats = daemon.cache.stats()
    assert (stats.cached, stats.leased, stats.num_leases, stats.free) == (2, 0, 0, daemon.pool.num_pages - 2)
    daemon.check()
    assert np.array_equal(daemon.cache.match(NS, prompt).page_ids, new_pages[:2])
