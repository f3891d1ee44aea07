"""The daemon's end of the worker channel: one ROUTER socket read straight from the event loop.

Every inbound frame is size-checked and decoded with the typed decoder before anything else sees it;
undecodable input is answered with ErrorReply(MALFORMED / TOO_LARGE) and never reaches the handlers.
A handler that raises is logged and answered with ErrorReply(INTERNAL): no message stops the reader.

Why no zmq.asyncio here: a Future and a task wake-up per frame cost more than the daemon's whole
handling of a 4096-token commit. The socket is a plain one; the loop watches its ZMQ_FD and the reader
drains with NOBLOCK. ZMQ_FD is edge-like: it signals "commands pending", and *any* operation on the
socket (recv, send, reading EVENTS) may consume that signal. Hence two rules:

- a drain reads until EAGAIN (or, after _DRAIN_BATCH messages, schedules itself again rather than
  wait for a signal that may never come), and
- a send made outside a drain (dispatch, a late PagesGranted, shutdown) re-checks EVENTS and schedules a
  drain if a message became readable meanwhile.

A watchdog re-checks EVENTS every 50 ms besides, so a signal lost any other way delays frames by at most
that much instead of stalling the socket (the hostile-frame fuzzer once caught such a stall).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from shared.protocol import MAX_FRAME_BYTES, Codec, DaemonToWorker, ErrorCode, ErrorReply, WorkerToDaemon

logger = logging.getLogger(__name__)

# libzmq drops (and disconnects) anything past this without reading it into memory; frames between
# MAX_FRAME_BYTES and this hard cap get a TOO_LARGE reply so a buggy worker learns why.
HARD_MAX_BYTES = MAX_FRAME_BYTES + (1 << 20)
_DRAIN_BATCH = 256  # messages handled per wake-up before other loop callbacks get a turn
_WATCHDOG_S = 0.05  # a missed FD signal can delay a frame by at most this much

# Plain ints: pyzmq's flag enums cost an enum.__or__ per combination on every call.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

Handler = Callable[[bytes, WorkerToDaemon], None]


class WorkerLink:
    """Owns the ROUTER socket. ``send`` never blocks: ROUTER drops frames for unknown or gone peers.

    Loop thread only: ``start`` registers the reader with the running loop, ``close`` unregisters it and
    closes the socket; after ``close`` nothing is read and ``send`` only logs.
    """

    def __init__(self, context: zmq.Context[Any], endpoint: str, handler: Handler) -> None:
        self._codec = Codec()
        self._encode = self._codec.encode
        self._decode = self._codec.decode_from_worker
        self._handler = handler
        # A plain socket even on a zmq.asyncio context: only the libzmq context is shared.
        self._socket: zmq.Socket[bytes] = zmq.Socket(context, zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 200)  # let Shutdown frames out on close, not forever
        self._socket.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_BYTES)
        self._socket.setsockopt(zmq.RCVHWM, 100_000)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._socket.bind(endpoint)
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int = self._socket.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._draining = False
        self._drain_scheduled = False
        self._watchdog_handle: asyncio.TimerHandle | None = None
        self.num_bad_messages = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        loop.add_reader(self._fd, self._drain)
        # Frames that arrived before the reader existed may have consumed the FD's signal already.
        self._schedule_drain()
        self._watchdog_handle = loop.call_later(_WATCHDOG_S, self._watchdog)

    async def close(self) -> None:
        if self._watchdog_handle is not None:
            self._watchdog_handle.cancel()
            self._watchdog_handle = None
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None
        self._socket.close()
        if self.endpoint.startswith("ipc://"):  # libzmq leaves the socket file behind
            Path(self.endpoint[len("ipc://") :]).unlink(missing_ok=True)

    def send(self, identity: bytes, msg: DaemonToWorker) -> None:
        data = self._encode(msg)
        sock = self._socket
        try:
            sock.send(identity, _SNDMORE_NOBLOCK)
            sock.send(data, _NOBLOCK)
        except zmq.ZMQError as exc:  # Again (peer's queue full) or the socket is closing
            logger.warning("send to worker %s failed: %s", identity.hex(), exc)
            return
        if not self._draining and not self._drain_scheduled and sock.getsockopt(_EVENTS) & _POLLIN:
            self._schedule_drain()

    def reply_error(self, identity: bytes, code: ErrorCode, message: str, request_id: bytes = b"") -> None:
        self.num_bad_messages += 1
        logger.warning("worker %s: %s: %s", identity.hex(), code.value, message)
        self.send(identity, ErrorReply(code=code, message=message, request_id=request_id))

    def _schedule_drain(self) -> None:
        if self._loop is not None and not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Handle queued messages until EAGAIN, or _DRAIN_BATCH of them and then come back soon.

        Leaving before EAGAIN without scheduling another drain would stall the socket for good: while
        frames are queued, libzmq signals nothing new on the FD. So every early exit reschedules."""
        self._drain_scheduled = False
        sock = self._socket
        if sock.closed:
            return
        recv, getsockopt = sock.recv, sock.getsockopt
        self._draining = True
        exhausted = False
        try:
            for _ in range(_DRAIN_BATCH):
                try:
                    identity = recv(_NOBLOCK)
                except zmq.Again:
                    exhausted = True
                    return
                data = recv(_NOBLOCK)  # ROUTER: the identity frame is always followed by a body frame
                if getsockopt(_RCVMORE):
                    self._refuse_multipart(identity)
                else:
                    self._on_message(identity, data)
        except Exception:
            logger.exception("reading the worker socket failed; reading on")
        finally:
            self._draining = False
            if not exhausted:
                self._schedule_drain()

    def _watchdog(self) -> None:
        """Belt and braces for the edge-like FD: re-check for readable frames every _WATCHDOG_S."""
        if self._loop is None or self._socket.closed:
            return
        if not self._draining and not self._drain_scheduled and self._socket.getsockopt(_EVENTS) & _POLLIN:
            self._schedule_drain()
        self._watchdog_handle = self._loop.call_later(_WATCHDOG_S, self._watchdog)

    def _refuse_multipart(self, identity: bytes) -> None:
        num_body_frames = 1
        while self._socket.getsockopt(_RCVMORE):
            self._socket.recv(_NOBLOCK)
            num_body_frames += 1
        self.reply_error(
            identity, ErrorCode.MALFORMED, f"expected one frame per message, got {num_body_frames}"
        )

    def _on_message(self, identity: bytes, data: bytes) -> None:
        if len(data) > MAX_FRAME_BYTES:
            self.reply_error(identity, ErrorCode.TOO_LARGE, f"frame of {len(data)} bytes > {MAX_FRAME_BYTES}")
            return
        try:
            msg = self._decode(data)
        except ValueError as exc:  # DecodeError, ValidationError, and UnicodeDecodeError for bad keys
            self.reply_error(identity, ErrorCode.MALFORMED, f"undecodable message: {exc}")
            return
        try:
            self._handler(identity, msg)
        except Exception as exc:
            logger.exception("handling %s from worker %s failed", type(msg).__name__, identity.hex())
            self.reply_error(identity, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
