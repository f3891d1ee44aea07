"""KV cache events on a ZeroMQ PUB socket, in the msgpack schema vLLM publishes.

Cluster routers (NVIDIA Dynamo's KV router, llm-d's KV-cache indexer) subscribe to this stream to learn
which box holds which prefix. The wire format matches vLLM's `vllm.distributed.kv_events`:

    frames:  [topic bytes, sequence number (8 bytes, big-endian, starts at 0), payload]
    payload: msgpack of EventBatch, array_like (fields by position, as vLLM's structs):
             [ts, [event, ...], data_parallel_rank]
    event:   ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]
             ["BlockRemoved", block_hashes, medium]
             ["AllBlocksCleared"]
    (msgspec writes every position of an array_like struct; decoders accept missing trailing defaults)

The publisher implements the cache core's CacheEvents protocol. The cache calls it synchronously from the
event loop thread; events are only buffered there and flushed as one batch at the end of the current
loop tick (call_soon), so a commit that stores many pages costs one send, and the cache never waits on
the socket: PUB drops messages for slow subscribers instead of blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq

logger = logging.getLogger(__name__)

# A batch is sent at once when this many events are waiting, so a burst (a flush of a huge tree)
# never builds an unbounded buffer even without a running loop.
MAX_EVENTS_PER_BATCH = 1024


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, tag=True, frozen=True):
    """Base of the event union; the msgpack tag is the class name."""


class BlockStored(KVCacheEvent, frozen=True):
    """Pages became cached: `block_hashes[i]` holds `token_ids[i*block_size:(i+1)*block_size]`,
    chained after `parent_block_hash` (None at the namespace root)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"


class BlockRemoved(KVCacheEvent, frozen=True):
    """Pages left the cache (evicted or flushed)."""

    block_hashes: list[int]
    medium: str | None = "GPU"


class AllBlocksCleared(KVCacheEvent, frozen=True):
    """The whole cache was dropped (admin flush, daemon restart)."""


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """One published message: the events of one event-loop tick, in the order the cache emitted them."""

    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one payload frame (for subscribers and tests). Raises msgspec.DecodeError on bad bytes."""
    return msgspec.msgpack.decode(payload, type=EventBatch)


class KVEventPublisher:
    """Publishes the cache's block events on a bound ZeroMQ PUB socket.

    State: a buffer of pending events and a sequence number that grows by one per sent batch. Call the
    CacheEvents methods only from the event loop thread (like the cache itself). `close()` sends what
    is still buffered and closes the socket; the publisher is unusable afterwards.

    `model` names the one model this stream describes: routers key a stream to one model, so events
    from a namespace of another model (which a daemon serving one model never has) are dropped with a
    log line rather than mixed in. Salted namespaces are published like any other: their block hashes
    already differ from unsalted ones, so routers never confuse the two.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        topic: str = "kv-events",
        model: str,
        medium: str = "GPU",
        data_parallel_rank: int | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if not endpoint:
            raise ValueError("endpoint must be a ZeroMQ endpoint such as tcp://*:5557")
        if not model:
            raise ValueError("model must be named")
        self._topic = topic.encode()
        self._model = model
        self._medium = medium
        self._dp_rank = data_parallel_rank
        self._encoder = msgspec.msgpack.Encoder()
        self._pending: list[KVCacheEvent] = []
        self._flush_scheduled = False
        self._seq = 0
        self._closed = False
        ctx = context if context is not None else zmq.Context.instance()
        self._socket = ctx.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 1000)  # let the last batches out on close, not forever
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._ipc_path: str | None = None
        try:
            self._bind(endpoint)
        except zmq.ZMQError:
            self._socket.close(linger=0)
            raise
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def _bind(self, endpoint: str) -> None:
        """Bind; an ipc:// socket file gets mode 0600 from the start, because the stream carries the token
        ids of every cached prompt (all tenants'), which other local users must not read."""
        if not endpoint.startswith("ipc://"):
            self._socket.bind(endpoint)
            return
        old_umask = os.umask(0o177)
        try:
            self._socket.bind(endpoint)
        finally:
            os.umask(old_umask)
        self._ipc_path = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)[len("ipc://") :]
        os.chmod(self._ipc_path, 0o600)

    @property
    def next_sequence(self) -> int:
        """The sequence number the next sent batch will carry."""
        return self._seq

    # CacheEvents ---------------------------------------------------------------------------------

    def blocks_stored(
        self,
        namespace: Any,
        parent_block_hash: int | None,
        block_hashes: Sequence[int],
        token_ids: Sequence[int],
        page_size: int,
    ) -> None:
        """Buffer a BlockStored event (pages that just became cached, in chain order)."""
        if not self._accepts(namespace) or len(block_hashes) == 0:
            return
        event = BlockStored(
            block_hashes=[int(h) for h in block_hashes],
            parent_block_hash=None if parent_block_hash is None else int(parent_block_hash),
            token_ids=[int(t) for t in token_ids],
            block_size=int(page_size),
            medium=self._medium,
        )
        self._add(event)

    def blocks_removed(self, namespace: Any, block_hashes: Sequence[int]) -> None:
        """Buffer a BlockRemoved event (pages evicted or flushed)."""
        if not self._accepts(namespace) or len(block_hashes) == 0:
            return
        self._add(BlockRemoved(block_hashes=[int(h) for h in block_hashes], medium=self._medium))

    def all_cleared(self) -> None:
        """Buffer an AllBlocksCleared event."""
        self._add(AllBlocksCleared())

    # Sending -------------------------------------------------------------------------------------

    def flush(self) -> int:
        """Send the buffered events as one batch now. Returns the number of events sent (0: nothing was
        pending). A subscriber that is too slow loses whole batches, never parts of one."""
        self._flush_scheduled = False
        if not self._pending or self._closed:
            return 0
        events, self._pending = self._pending, []
        batch = EventBatch(ts=time.time(), events=events, data_parallel_rank=self._dp_rank)  # type: ignore[arg-type]
        frames = [self._topic, self._seq.to_bytes(8, "big"), self._encoder.encode(batch)]
        self._seq += 1
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            logger.warning("kv events: send queue full, dropped a batch of %d events", len(events))
        return len(events)

    def close(self) -> None:
        """Send anything buffered, then close the socket (an ipc:// file is removed). Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._socket.close()
        if self._ipc_path is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self._ipc_path).st_mode):
                    os.unlink(self._ipc_path)

    def _accepts(self, namespace: Any) -> bool:
        model = getattr(namespace, "model", self._model)
        if model != self._model:
            logger.warning("kv events: dropping events of model %r (publisher is for %r)", model, self._model)
            return False
        return True

    def _add(self, event: KVCacheEvent) -> None:
        if self._closed:
            # The cache may outlive the publisher during shutdown; its last events have no audience.
            logger.debug("kv events: publisher closed, dropped %s", type(event).__name__)
            return
        self._pending.append(event)
        if len(self._pending) >= MAX_EVENTS_PER_BATCH:
            self.flush()
            return
        if not self._flush_scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a synchronous caller): events wait for an explicit flush()
            loop.call_soon(self.flush)
            self._flush_scheduled = True
