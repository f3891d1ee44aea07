"""The worker's ZeroMQ link to the daemon: one DEALER socket, its codec, and a disconnect monitor.

A DEALER never reports that its peer went away, so a monitor socket watches for EVENT_DISCONNECTED
(the daemon process died or closed the connection); the runtime then drops the session and registers
again on a fresh socket, which also discards anything queued for the dead peer.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from shared.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Codec,
    DaemonToWorker,
    Register,
    Welcome,
    WorkerToDaemon,
)

log = logging.getLogger(__name__)


class DaemonLink:
    """One registration's connection. Create, `await register(...)`, then `send` / `recv`; `close` when
    done. Only the event loop thread may use it."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, codec: Codec) -> None:
        self._codec = codec
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock.connect(endpoint)
        self.disconnected = asyncio.Event()
        self._monitor_task = asyncio.ensure_future(self._watch())
        self._closed = False

    async def register(self, msg: Register, timeout_s: float) -> Welcome | None:
        """Send Register and wait for Welcome. None on timeout or a disconnect. Raises RuntimeError if
        the daemon speaks another protocol version (no retry can fix that)."""
        await self.send(msg)
        try:
            return await asyncio.wait_for(self._await_welcome(), timeout_s)
        except asyncio.TimeoutError:
            return None

    async def _await_welcome(self) -> Welcome:
        while True:
            reply = await self.recv()
            if isinstance(reply, Welcome):
                if reply.protocol_version != PROTOCOL_VERSION:
                    raise RuntimeError(
                        f"daemon speaks protocol {reply.protocol_version}, worker {PROTOCOL_VERSION}"
                    )
                return reply
            log.warning("ignoring %s before Welcome", type(reply).__name__)

    async def send(self, msg: WorkerToDaemon) -> None:
        await self._sock.send(self._codec.encode(msg), copy=False)

    async def recv(self) -> DaemonToWorker | None:
        """The next message; None for a frame that does not decode (logged, never fatal)."""
        data = await self._sock.recv()
        try:
            return self._codec.decode_from_daemon(data)
        except ValueError as exc:  # msgspec's errors and UnicodeDecodeError (bad UTF-8 in a key)
            log.error("dropping a malformed frame from the daemon: %s", exc)
            return None

    async def _watch(self) -> None:
        try:
            while True:
                event = parse_monitor_message(await self._monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    log.warning("daemon connection lost")
                    self.disconnected.set()
        except (zmq.ZMQError, asyncio.CancelledError):
            return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._monitor_task.cancel()
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
