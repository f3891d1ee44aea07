"""KV events: a SUB socket decodes the publisher's stream while a real PrefixCache commits, evicts and
flushes; the stream must match the tree's changes exactly (hashes, parents, tokens, order, sequence)."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq

from cachemgr.cache import Namespace, PrefixCache
from cachemgr.cache.hashing import PageHasher, block_hashes, namespace_seed
from cachemgr.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEventPublisher,
    decode_batch,
)
from tests.admin.conftest import MODEL, NUM_PAGES, PAGE_SIZE, cache_prompt

TOPIC = b"kv-events"


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture
def publisher(short_dir: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]) -> Iterator[KVEventPublisher]:
    pub = KVEventPublisher(f"ipc://{short_dir}/events.sock", model=MODEL, context=zmq_context)
    yield pub
    pub.close()


@pytest.fixture
def subscriber(
    publisher: KVEventPublisher, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> Iterator[zmq.Socket[bytes]]:
    """A SUB socket that has provably joined: PUB drops everything sent before a subscription lands, so
    send probes until one arrives, then drain the rest."""
    sub = zmq_context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
    sub.connect(publisher.endpoint)
    for _ in range(100):
        publisher.all_cleared()
        publisher.flush()
        if sub.poll(50):
            break
    else:
        pytest.fail("subscriber never received a probe")
    while sub.poll(100):
        sub.recv_multipart()
    yield sub
    sub.close()


def recv_batch(sub: zmq.Socket[bytes]) -> tuple[bytes, int, EventBatch]:
    assert sub.poll(5000), "no batch arrived"
    topic, seq, payload = sub.recv_multipart()
    assert len(seq) == 8
    return topic, int.from_bytes(seq, "big"), decode_batch(payload)


def expected_hashes(ns: Namespace, tokens: list[int]) -> list[int]:
    """Block hashes of the prompt's full pages, computed from scratch (the chain starts at the namespace)."""
    num_full = len(tokens) // PAGE_SIZE * PAGE_SIZE
    prefix = PageHasher(PAGE_SIZE).prefix_hashes(
        namespace_seed(ns.model, ns.salt), np.asarray(tokens[:num_full], dtype=np.int32)
    )
    return block_hashes(prefix)


async def test_stream_matches_tree_changes(
    publisher: KVEventPublisher, subscriber: zmq.Socket[bytes]
) -> None:
    cache = PrefixCache(NUM_PAGES, page_size=PAGE_SIZE, events=publisher)
    ns, salted = Namespace(MODEL), Namespace(MODEL, "tenant-1")
    prompt_a = list(range(1, 14))  # 3 full pages + 1 token that stays private
    prompt_b = [*prompt_a[:8], 50, 51, 52, 53]  # shares 2 pages with A
    prompt_c = [7] * 8
    hash_a, hash_b, hash_c = (
        expected_hashes(ns, prompt_a),
        expected_hashes(ns, prompt_b),
        expected_hashes(salted, prompt_c),
    )
    assert hash_a[:2] == hash_b[:2] and hash_a[2] != hash_b[2]
    assert hash_c != expected_hashes(ns, prompt_c)  # salted namespaces never share hashes
    seq0 = publisher.next_sequence
    live: dict[int, list[int]] = {}  # the subscriber's index: block hash -> its tokens

    def receive(expected_seq: int) -> list[BlockStored | BlockRemoved | AllBlocksCleared]:
        topic, seq, batch = recv_batch(subscriber)
        assert (topic, seq, batch.data_parallel_rank) == (TOPIC, expected_seq, None)
        for event in batch.events:
            if isinstance(event, BlockStored):
                for i, h in enumerate(event.block_hashes):
                    live[h] = event.token_ids[i * event.block_size : (i + 1) * event.block_size]
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    del live[h]
            else:
                live.clear()
        return batch.events

    cache_prompt(cache, prompt_a)
    await asyncio.sleep(0)  # the publisher flushes at the end of the loop tick
    assert receive(seq0) == [BlockStored(hash_a, None, prompt_a[:12], PAGE_SIZE)]

    cache_prompt(cache, prompt_b)
    await asyncio.sleep(0)
    assert receive(seq0 + 1) == [BlockStored([hash_b[2]], hash_a[1], [50, 51, 52, 53], PAGE_SIZE)]

    cache_prompt(cache, prompt_c, salted)
    await asyncio.sleep(0)
    assert receive(seq0 + 2) == [BlockStored(hash_c, None, prompt_c, PAGE_SIZE)]
    assert len(live) == cache.stats().cached == 6

    assert cache.evict(1) == 1  # LRU: A's private tail page is the oldest leaf
    await asyncio.sleep(0)
    assert receive(seq0 + 3) == [BlockRemoved([hash_a[2]])]
    assert sorted(live) == sorted([hash_a[0], hash_a[1], hash_b[2], *hash_c])
    assert live[hash_b[2]] == [50, 51, 52, 53]
    assert len(live) == cache.stats().cached == 5

    assert cache.flush() == 5
    await asyncio.sleep(0)
    # One tick, one batch: leaves before their parents, namespace by namespace, then the clear.
    assert receive(seq0 + 4) == [
        BlockRemoved([hash_b[2]]),
        BlockRemoved(hash_a[:2]),
        BlockRemoved(hash_c),
        AllBlocksCleared(),
    ]
    assert live == {} and cache.stats().cached == 0
    cache.check()
    assert not subscriber.poll(100)  # nothing else was sent
    assert publisher.next_sequence == seq0 + 5


def test_ipc_socket_is_0600_and_removed_on_close(
    short_dir: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    pub = KVEventPublisher(f"ipc://{short_dir}/ev.sock", model=MODEL, context=zmq_context)
    mode = os.lstat(short_dir / "ev.sock").st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    pub.close()
    assert not (short_dir / "ev.sock").exists()


def test_wire_format_is_vllm_array_like(publisher: KVEventPublisher, subscriber: zmq.Socket[bytes]) -> None:
    """Without a running loop events wait for flush(); the raw msgpack is the positional vLLM layout."""
    publisher.blocks_stored(Namespace(MODEL), 11, [21, 22], list(range(8)), 4)
    publisher.blocks_removed(Namespace(MODEL), [21])
    assert not subscriber.poll(100)  # buffered, not sent
    assert publisher.flush() == 2
    assert publisher.flush() == 0  # nothing pending: nothing sent
    assert subscriber.poll(5000)
    _topic, _seq, payload = subscriber.recv_multipart()
    ts, events, dp_rank = msgspec.msgpack.decode(payload)
    assert isinstance(ts, float) and dp_rank is None
    assert events == [
        ["BlockStored", [21, 22], 11, [0, 1, 2, 3, 4, 5, 6, 7], 4, None, "GPU"],
        ["BlockRemoved", [21], "GPU"],
    ]
    assert not subscriber.poll(100)


def test_other_models_and_empty_events_are_not_published(
    publisher: KVEventPublisher, subscriber: zmq.Socket[bytes]
) -> None:
    publisher.blocks_stored(Namespace("another-model"), None, [1], [1, 2, 3, 4], 4)
    publisher.blocks_removed(Namespace("another-model"), [1])
    publisher.blocks_removed(Namespace(MODEL), [])
    assert publisher.flush() == 0
    assert not subscriber.poll(100)


def test_close_sends_what_is_buffered(short_dir: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    pub = KVEventPublisher(f"ipc://{short_dir}/close.sock", model=MODEL, medium="CPU", context=zmq_context)
    sub = zmq_context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.endpoint)
    for _ in range(100):  # join first (see the subscriber fixture)
        pub.all_cleared()
        pub.flush()
        if sub.poll(50):
            break
    while sub.poll(100):
        sub.recv_multipart()
    pub.blocks_removed(Namespace(MODEL), [5, 6])
    pub.close()
    pub.blocks_removed(Namespace(MODEL), [7])  # after close: dropped, not raised into the cache
    assert sub.poll(5000)
    batch = decode_batch(sub.recv_multipart()[2])
    assert batch.events == [BlockRemoved([5, 6], medium="CPU")]
    assert not sub.poll(100)
    sub.close()


def test_constructor_rejects_misuse(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        KVEventPublisher("", model=MODEL, context=zmq_context)
    with pytest.raises(ValueError, match="model"):
        KVEventPublisher("tcp://127.0.0.1:*", model="", context=zmq_context)
    with pytest.raises(zmq.ZMQError):
        KVEventPublisher("nonsense://x", model=MODEL, context=zmq_context)
