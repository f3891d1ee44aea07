"""WorkerLink's reader over a real ROUTER socket, on both the stdlib loop and uvloop.

The reader is a loop reader callback on ZMQ_FD, which only signals "commands pending" and can be consumed
by any operation on the socket; these tests pin the cases where a naive reader stops reading.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
import zmq

from cachemgr.daemon.link import _DRAIN_BATCH, WorkerLink
from shared.protocol import Abort, Codec, ErrorCode, ErrorReply, Heartbeat, WorkerToDaemon

CODEC = Codec()
LOOPS = pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)


class Harness:
    """A WorkerLink whose handler records what it got, and one hand-driven DEALER named b"w"."""

    def __init__(
        self, tmp_path: Path, handler: Callable[[bytes, WorkerToDaemon], None] | None = None
    ) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.got: list[tuple[bytes, WorkerToDaemon]] = []
        self.link = WorkerLink(self.ctx, f"ipc://{tmp_path}/link.sock", handler or self._record)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IDENTITY, b"w")
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(self.link.endpoint)

    def _record(self, identity: bytes, msg: WorkerToDaemon) -> None:
        self.got.append((identity, msg))

    async def replies(self, n: int) -> list[object]:
        out: list[object] = []
        deadline = time.monotonic() + 10.0
        while len(out) < n:
            assert time.monotonic() < deadline, f"only {len(out)} of {n} replies"
            if self.dealer.poll(0):
                out.append(CODEC.decode_from_daemon(self.dealer.recv()))
            else:
                await asyncio.sleep(0.002)
        return out

    async def until_got(self, n: int) -> None:
        deadline = time.monotonic() + 10.0
        while len(self.got) < n:
            assert time.monotonic() < deadline, f"handler saw {len(self.got)} of {n} messages"
            await asyncio.sleep(0.002)

    async def close(self) -> None:
        await self.link.close()
        self.dealer.close()
        self.ctx.term()


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro)


def heartbeat(i: int) -> bytes:
    return CODEC.encode(Heartbeat(num_running=i, num_waiting=0))


@LOOPS
def test_a_burst_larger_than_one_drain_batch_is_read_completely_in_order(
    loop_factory, tmp_path: Path
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.link.start()
        num = 2 * _DRAIN_BATCH + 7
        for i in range(num):
            h.dealer.send(heartbeat(i))
        await h.until_got(num)
        assert [(identity, msg.num_running) for identity, msg in h.got] == [(b"w", i) for i in range(num)]  # type: ignore[union-attr]
        await h.close()

    run(loop_factory, scenario())


@LOOPS
def test_a_send_outside_the_reader_does_not_swallow_a_queued_message(loop_factory, tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.link.start()
        h.dealer.send(heartbeat(1))
        await h.until_got(1)
        await h.replies(0)
        # Without yielding to the loop: a message arrives, then a send (as the scheduler's dispatch
        # does) processes the socket's pending commands and with them the FD's only signal.
        h.dealer.send(heartbeat(2))
        time.sleep(0.05)
        h.link.send(b"w", Abort(request_id=b"r", reason="test"))
        await h.until_got(2)
        assert [msg.num_running for _, msg in h.got] == [1, 2]  # type: ignore[union-attr]
        assert await h.replies(1) == [Abort(request_id=b"r", reason="test")]
        await h.close()

    run(loop_factory, scenario())


@LOOPS
def test_messages_sent_before_start_are_read(loop_factory, tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.dealer.send(heartbeat(5))
        time.sleep(0.05)
        h.link.start()
        await h.until_got(1)
        assert h.got[0][1] == Heartbeat(num_running=5, num_waiting=0)
        await h.close()

    run(loop_factory, scenario())


@LOOPS
def test_bad_frames_get_typed_replies_and_the_reader_goes_on(loop_factory, tmp_path: Path) -> None:
    def handler(identity: bytes, msg: WorkerToDaemon) -> None:
        if isinstance(msg, Heartbeat) and msg.num_running == 13:
            raise RuntimeError("unlucky")
        h._record(identity, msg)

    async def scenario() -> None:
        h.link.start()
        h.dealer.send_multipart([heartbeat(1), b"x", b"y"])
        h.dealer.send(b"\xc1 not msgpack")
        h.dealer.send(b"\x81\xa4typ\xed\xacpage_request")  # a map key that is not UTF-8
        h.dealer.send(heartbeat(13))
        h.dealer.send(heartbeat(2))
        replies = await h.replies(4)
        assert [(r.code, r.request_id) for r in replies] == [  # type: ignore[attr-defined]
            (ErrorCode.MALFORMED, b""),
            (ErrorCode.MALFORMED, b""),
            (ErrorCode.MALFORMED, b""),
            (ErrorCode.INTERNAL, b""),
        ]
        assert all(isinstance(r, ErrorReply) for r in replies)
        assert replies[0].message == "expected one frame per message, got 3"  # type: ignore[attr-defined]
        assert replies[3].message == "RuntimeError: unlucky"  # type: ignore[attr-defined]
        await h.until_got(1)
        assert h.got == [(b"w", Heartbeat(num_running=2, num_waiting=0))]
        assert h.link.num_bad_messages == 4
        await h.close()

    h = Harness(tmp_path, handler)
    run(loop_factory, scenario())


@LOOPS
def test_after_close_nothing_is_read_and_send_only_logs(loop_factory, tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.link.start()
        assert (tmp_path / "link.sock").exists()
        await h.link.close()
        assert not (tmp_path / "link.sock").exists()  # the ipc socket file goes with the socket
        h.link.send(b"w", Abort(request_id=b"r", reason="late"))  # must not raise
        await asyncio.sleep(0.02)
        assert h.got == []
        h.dealer.close()
        h.ctx.term()

    run(loop_factory, scenario())
