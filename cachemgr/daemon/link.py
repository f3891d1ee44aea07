"""The daemon's end of the worker channel: one ROUTER socket, one reader task, typed decoding.

Every inbound frame is size-checked and decoded with the typed decoder before anything else sees it;
undecodable input is answered with ErrorReply(MALFORMED / TOO_LARGE) and never reaches the handlers.
A handler that raises is logged and answered with ErrorReply(INTERNAL): no message stops the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from shared.protocol import MAX_FRAME_BYTES, Codec, DaemonToWorker, ErrorCode, ErrorReply, WorkerToDaemon

logger = logging.getLogger(__name__)

# libzmq drops (and disconnects) anything past this without reading it into memory; frames between
# MAX_FRAME_BYTES and this hard cap get a TOO_LARGE reply so a buggy worker learns why.
HARD_MAX_BYTES = MAX_FRAME_BYTES + (1 << 20)
_DRAIN_BATCH = 256  # frames read per wake-up before yielding to the loop

Handler = Callable[[bytes, WorkerToDaemon], None]


class WorkerLink:
    """Owns the ROUTER socket. ``send`` never blocks: ROUTER drops frames for unknown or gone peers."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, handler: Handler) -> None:
        self._codec = Codec()
        self._handler = handler
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 200)  # let Shutdown frames out on close, not forever
        self._socket.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_BYTES)
        self._socket.setsockopt(zmq.RCVHWM, 100_000)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._socket.bind(endpoint)
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # A synchronous view of the same socket for non-blocking sends and draining reads without a
        # Future per frame (same thread as the async socket, so this is safe).
        self._sync = zmq.Socket.shadow(self._socket.underlying)
        self._task: asyncio.Task[None] | None = None
        self.num_bad_messages = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._read(), name="worker-link-reader")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._socket.close()

    def send(self, identity: bytes, msg: DaemonToWorker) -> None:
        try:
            self._sync.send_multipart((identity, self._codec.encode(msg)), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # Again (peer's queue full) or the socket is closing
            logger.warning("send to worker %s failed: %s", identity.hex(), exc)

    def reply_error(self, identity: bytes, code: ErrorCode, message: str, request_id: bytes = b"") -> None:
        self.num_bad_messages += 1
        logger.warning("worker %s: %s: %s", identity.hex(), code.value, message)
        self.send(identity, ErrorReply(code=code, message=message, request_id=request_id))

    async def _read(self) -> None:
        sock, sync = self._socket, self._sync
        while True:
            frames = await sock.recv_multipart()
            self._on_frames(frames)
            for _ in range(_DRAIN_BATCH):
                try:
                    frames = sync.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_frames(frames)

    def _on_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) != 2:
            self.reply_error(
                identity, ErrorCode.MALFORMED, f"expected one frame per message, got {len(frames) - 1}"
            )
            return
        data = frames[1]
        if len(data) > MAX_FRAME_BYTES:
            self.reply_error(identity, ErrorCode.TOO_LARGE, f"frame of {len(data)} bytes > {MAX_FRAME_BYTES}")
            return
        try:
            msg = self._codec.decode_from_worker(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.reply_error(identity, ErrorCode.MALFORMED, f"undecodable message: {exc}")
            return
        try:
            self._handler(identity, msg)
        except Exception as exc:
            logger.exception("handling %s from worker %s failed", type(msg).__name__, identity.hex())
            self.reply_error(identity, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
