"""Fuzzing the worker socket: >= 100k malformed and hostile frames from registered and unregistered
DEALER sockets against a running daemon that serves real requests meanwhile.

Afterwards: the daemon never stopped reading, no reply was INTERNAL (no handler crashed), check()
holds, every request submitted during the storm ended (finished or failed cleanly, none hangs), well
behaved requests get exact outputs, no page is leaked and memory stayed bounded.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from pathlib import Path

import pytest
import zmq

from cachemgr.daemon.errors import RequestFailed
from shared.ids import bytes_to_ids, ids_to_bytes
from shared.protocol import (
    PROTOCOL_VERSION,
    Codec,
    Commit,
    Dispatch,
    ErrorReply,
    Finished,
    FinishReason,
    Generated,
    PageRequest,
    Register,
    SamplingParams,
)
from tests.hardening.conftest import NS, assert_idle_baseline, collect, rss_mib, serving, until
from tests.hardening.figures import record
from tests.hardening.hostile import Known, goodbye, hostile_frame
from tests.helpers.scripted_worker import expected_output

NUM_FRAMES = 100_000
BATCH = 500
CODEC = Codec()


class Fuzzer:
    """One hostile DEALER identity. Registered ones receive Dispatches and answer them with hostile
    (and now and then valid) commits and finishes."""

    def __init__(self, ctx: zmq.Context, endpoint: str, index: int, registered: bool, known: Known) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)
        self.index = index
        self.registered = registered
        self.known = known
        self.barrier = b""
        self.replies: Counter[str] = Counter()
        self.dispatches: list[Dispatch] = []

    def register(self) -> bytes:
        return CODEC.encode(
            Register(protocol_version=PROTOCOL_VERSION, pid=1, device="cpu", max_running=2, model="fuzz")
        )

    def frames(self, rng: random.Random, num_pages: int, count: int, round_no: int) -> list[bytes]:
        out = []
        for d in self.dispatches:  # valid-but-hostile: a foreign commit, then maybe a valid one
            prompt = bytes_to_ids(d.tokens).tolist()
            pages = bytes_to_ids(d.prefix_page_ids).tolist() + bytes_to_ids(d.new_page_ids).tolist()
            full = len(prompt) // 4
            if full and rng.random() < 0.5:
                commit = Commit(d.request_id, ids_to_bytes(prompt[: 4 * full]), ids_to_bytes(pages[:full]))
                out.append(CODEC.encode(commit))
            if rng.random() < 0.3:  # far more tokens than max_tokens: refused, not buffered
                out.append(CODEC.encode(Generated(d.request_id, ids_to_bytes([5] * 100_000))))
            if rng.random() < 0.6:
                out.append(CODEC.encode(Finished(d.request_id, FinishReason.LENGTH)))
        self.dispatches.clear()
        out += [hostile_frame(rng, self.known, num_pages) for _ in range(count - len(out))]
        if self.registered:  # (re-)register last, so it is a worker while the victims are dispatched
            out.append(self.register())
        self.barrier = b"barrier-%d-%d" % (self.index, round_no)
        out.append(CODEC.encode(PageRequest(request_id=self.barrier, num_pages=1)))
        return out

    def drain(self) -> bool:
        """Read what arrived; True once the barrier's reply came back (everything before it was read)."""
        done = False
        while True:
            try:
                msg = CODEC.decode_from_daemon(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return done
            self.replies[type(msg).__name__ if not isinstance(msg, ErrorReply) else msg.code.value] += 1
            if isinstance(msg, Dispatch):
                self.dispatches.append(msg)
                self.known.request_ids.append(msg.request_id)
                self.known.prompts[msg.request_id] = msg.tokens
                self.known.page_ids.extend(bytes_to_ids(msg.new_page_ids).tolist()[:4])
            elif isinstance(msg, ErrorReply) and msg.request_id == self.barrier:
                done = True


async def _victims(stack: object, stop: asyncio.Event, outcomes: Counter[str]) -> None:
    """Real requests submitted during the storm; some land on hostile workers."""
    rng = random.Random(7)
    while not stop.is_set():
        prompt = [rng.randrange(3, 1000) for _ in range(rng.randrange(1, 40))]
        try:
            stream = await stack.daemon.submit(NS, prompt, SamplingParams(temperature=0.0, max_tokens=4))  # type: ignore[attr-defined]
            tokens, _ = await asyncio.wait_for(collect(stream), 30.0)
            assert len(tokens) <= 4  # a hostile worker can't push more than max_tokens
            outcomes["ended"] += 1
        except RequestFailed:
            outcomes["failed_cleanly"] += 1


@pytest.mark.slow
async def test_100k_hostile_frames_on_the_worker_socket(tmp_path: Path) -> None:
    daemon_log = logging.getLogger("cachemgr")
    level = daemon_log.level
    daemon_log.setLevel(logging.ERROR)  # 100k warnings would only measure the log handler
    try:
        await _storm(tmp_path)
    finally:
        daemon_log.setLevel(level)


async def _storm(tmp_path: Path) -> None:
    async with serving(
        tmp_path, num_pages=128, page_size=4, heartbeat_timeout_s=0.5, page_wait_timeout_s=0.5
    ) as stack:
        daemon = stack.daemon
        stack.start_scripted("good", "--max-running", "4")
        await until(lambda: len(daemon.workers_info()) == 1, what="good worker registered")
        ctx = zmq.Context()
        known = Known()
        fuzzers = [Fuzzer(ctx, daemon.endpoint, i, registered=i < 3, known=known) for i in range(6)]
        stop = asyncio.Event()
        outcomes: Counter[str] = Counter()
        victims = [asyncio.ensure_future(_victims(stack, stop, outcomes)) for _ in range(8)]
        rng = random.Random(20240)
        num_pages = daemon.pool.num_pages
        sent, round_no, rss_base, next_index = 0, 0, 0.0, len(fuzzers)
        churned: Counter[str] = Counter()
        started = time.monotonic()
        while sent < NUM_FRAMES:
            round_no += 1
            for f in fuzzers:
                for frame in f.frames(rng, num_pages, BATCH, round_no):
                    f.sock.send(frame, zmq.NOBLOCK)
                    sent += 1
            pending = set(fuzzers)
            deadline = time.monotonic() + 30.0
            while pending:
                pending = {f for f in pending if not f.drain()}
                assert time.monotonic() < deadline, (
                    f"the daemon stopped answering in round {round_no} after "
                    f"{daemon.stats()['bad_messages']} bad messages"
                )
                await asyncio.sleep(0.001)
            if round_no % 4 == 0:  # identity churn: a fresh unregistered sender replaces one
                old = fuzzers.pop(3)
                old.sock.close()
                churned += old.replies
                fuzzers.append(Fuzzer(ctx, daemon.endpoint, next_index, registered=False, known=known))
                next_index += 1
            if not rss_base and sent >= 10_000:
                rss_base = rss_mib()
            daemon.check()
        storm_s = time.monotonic() - started
        rss_end = rss_mib()
        replies = sum((f.replies for f in fuzzers), churned)
        for f in fuzzers:
            if f.registered:
                f.sock.send(goodbye())
            f.sock.close()
        ctx.term()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*victims), 40.0)  # every victim ended: none hangs
        await until(lambda: len(daemon.workers_info()) == 1, 5.0, "hostile workers gone")

        assert replies["internal"] == 0
        assert daemon.stats()["bad_messages"] >= NUM_FRAMES // 2
        for n in (1, 5, 17, 33):  # the good worker still serves exactly
            prompt = list(range(100, 100 + n))
            stream = await daemon.submit(NS, prompt, SamplingParams(temperature=0.0, max_tokens=6))
            assert await collect(stream) == (expected_output(prompt, 6), FinishReason.LENGTH)
        await until(lambda: daemon.cache.stats().num_leases == 0, 5.0)
        assert_idle_baseline(daemon)
        assert rss_end - rss_base < 40.0, (rss_base, rss_end)
        record(
            "fuzz_worker_socket",
            frames=sent,
            seconds=round(storm_s, 1),
            frames_per_s=round(sent / storm_s),
            bad_messages=daemon.stats()["bad_messages"],
            replies=dict(sorted(replies.items())),
            victims=dict(outcomes),
            rss_mib_after_10k=round(rss_base, 1),
            rss_mib_end=round(rss_end, 1),
        )


async def test_invalid_utf8_field_name_is_malformed_and_the_reader_survives(tmp_path: Path) -> None:
    """Found by the fuzzer: msgspec raises UnicodeDecodeError (not DecodeError) for a key that is not
    UTF-8; it used to escape the reader task, after which the daemon ignored every worker."""
    async with serving(tmp_path) as stack:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(stack.daemon.endpoint)
        try:
            sock.send(b"\x81\xa4typ\xed\xacpage_request")  # {"typ\xed": "page_request"}
            sock.send(CODEC.encode(PageRequest(request_id=b"after", num_pages=1)))
            replies = []
            for _ in range(2):
                await until(lambda: sock.poll(0), 5.0, "a reply")
                replies.append(CODEC.decode_from_daemon(sock.recv()))
            assert [(r.code.value, r.request_id) for r in replies] == [  # type: ignore[attr-defined]
                ("malformed", b""),
                ("not_registered", b"after"),
            ]
        finally:
            sock.close()
            ctx.term()
