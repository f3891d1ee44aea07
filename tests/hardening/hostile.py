"""Generators of malformed and hostile worker-protocol frames (seeded, fast: ~100k frames a second).

Each call returns one frame (bytes) for the daemon's worker socket. The mix covers: random garbage,
truncated and bit-flipped valid frames, real tags with wrongly typed fields, msgpack headers that claim
huge lengths, wrong protocol versions, and well-typed messages carrying forged request ids, negative or
out-of-range page ids, misaligned id arrays and absurd counts. ``known`` request ids / page ids (learnt
from Dispatches a hostile registered worker received) make the forgeries realistic.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import msgspec

from shared.protocol import (
    PROTOCOL_VERSION,
    Codec,
    Commit,
    ErrorCode,
    Finished,
    FinishReason,
    Generated,
    Goodbye,
    Heartbeat,
    PageRequest,
    Register,
    WorkerError,
)

TAGS = ("register", "heartbeat", "commit", "page_request", "generated", "finished", "worker_error", "goodbye")
# msgpack headers that announce far more data than follows: str32, bin32, array32, map32, ext32.
HUGE_HEADERS = (b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xc9")
_ENC = msgspec.msgpack.Encoder()
_CODEC = Codec()


class Known:
    """What a hostile worker learnt: real request ids (its own and others') and real page ids."""

    def __init__(self) -> None:
        self.request_ids: list[bytes] = [b"\x00" * 16]
        self.page_ids: list[int] = [0]
        self.prompts: dict[bytes, bytes] = {}


def _ids(rng: random.Random, known: Known, num_pages: int) -> bytes:
    n = rng.choice((0, 1, 2, 3, 7, 64))
    pool = (-1, -(2**31), 2**31 - 1, num_pages, num_pages + 1, 10**9, *known.page_ids[-8:])
    return struct.pack(
        f"<{n}i", *(rng.choice(pool) if rng.random() < 0.7 else rng.randrange(num_pages) for _ in range(n))
    )


def _request_id(rng: random.Random, known: Known) -> bytes:
    r = rng.random()
    if r < 0.5:
        return rng.choice(known.request_ids[-32:])
    if r < 0.7:
        return rng.randbytes(rng.choice((0, 1, 16, 65, 300)))
    return rng.randbytes(16)


def _wrong_value(rng: random.Random) -> object:
    return rng.choice(
        (None, True, -1, 2**63 - 1, -(2**63), 1.5, float("nan"), "x" * rng.randrange(50), b"\xff" * 9,
         [1, "a", None], {"k": [1, 2]}, {}, [], 2**64 - 1)
    )  # fmt: skip


def _valid_typed(rng: random.Random, known: Known, num_pages: int) -> bytes:
    rid = _request_id(rng, known)
    kind = rng.randrange(8)
    if kind == 0:
        tokens = (
            known.prompts.get(rid, b"") if rng.random() < 0.5 else rng.randbytes(4 * rng.randrange(0, 20))
        )
        msg: object = Commit(
            request_id=rid,
            tokens=tokens[: 4 * rng.randrange(0, 40)] + rng.randbytes(rng.choice((0, 0, 1, 3))),
            page_ids=_ids(rng, known, num_pages),
        )
    elif kind == 1:
        msg = PageRequest(
            request_id=rid, num_pages=rng.choice((0, -1, 1, 2, num_pages, num_pages + 1, 2**62))
        )
    elif kind == 2:
        msg = Generated(request_id=rid, tokens=rng.randbytes(rng.choice((0, 1, 4, 8, 4000))))
    elif kind == 3:
        msg = Finished(
            request_id=rid,
            reason=rng.choice(list(FinishReason)),
            tokens=rng.randbytes(rng.choice((0, 4, 64))),
            page_ids=_ids(rng, known, num_pages),
            stop_text="s" * rng.randrange(3),
        )
    elif kind == 4:
        msg = WorkerError(
            code=rng.choice(list(ErrorCode)), message="m", request_id=rid if rng.random() < 0.9 else b""
        )
    elif kind == 5:
        msg = Heartbeat(
            num_running=rng.choice((-5, 0, 2**62)), num_waiting=rng.choice((0, -1)), kv_tokens_in_use=-3
        )
    elif kind == 6:
        msg = Register(
            protocol_version=rng.choice((0, -1, PROTOCOL_VERSION + 1, 2**40)),
            pid=-1,
            device="cpu",
            max_running=1,
            model="m",
        )
    else:
        msg = Register(
            protocol_version=PROTOCOL_VERSION,
            pid=rng.randrange(2**31),
            device="d" * rng.randrange(4),
            max_running=rng.choice((0, -1)),
            model="evil",
        )
    return _CODEC.encode(msg)  # type: ignore[arg-type]


def _garbage(rng: random.Random, known: Known, num_pages: int) -> bytes:
    return rng.randbytes(rng.choice((0, 1, 2, 5, 17, 64, 300)))


def _truncated(rng: random.Random, known: Known, num_pages: int) -> bytes:
    data = _valid_typed(rng, known, num_pages)
    return data[: rng.randrange(len(data))]


def _bitflip(rng: random.Random, known: Known, num_pages: int) -> bytes:
    data = bytearray(_valid_typed(rng, known, num_pages))
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def _wrong_types(rng: random.Random, known: Known, num_pages: int) -> bytes:
    fields = ("request_id", "tokens", "page_ids", "num_pages", "reason", "code", "message", "protocol_version",
              "pid", "device", "max_running", "model", "num_running", "num_waiting", "unknown_field")  # fmt: skip
    body: dict[str, object] = {"type": rng.choice((*TAGS, "dispatch", "welcome", "", "x" * 40))}
    for name in rng.sample(fields, rng.randrange(0, 5)):
        body[name] = _wrong_value(rng)
    return _ENC.encode(body if rng.random() < 0.9 else [body, body])


def _huge_lengths(rng: random.Random, known: Known, num_pages: int) -> bytes:
    header = rng.choice(HUGE_HEADERS) + struct.pack(">I", rng.choice((2**32 - 1, 2**31, 10**9)))
    if rng.random() < 0.5:
        return header + rng.randbytes(rng.randrange(8))
    # the huge header as the value of a field inside a real-looking message
    prefix = _ENC.encode({"type": "commit", "request_id": b"x"})
    return prefix[:1].replace(b"\x82", b"\x83") + prefix[1:] + _ENC.encode("tokens") + header


GENERATORS: tuple[Callable[[random.Random, Known, int], bytes], ...] = (
    _garbage, _truncated, _bitflip, _wrong_types, _huge_lengths, _valid_typed, _valid_typed, _valid_typed
)  # fmt: skip


def hostile_frame(rng: random.Random, known: Known, num_pages: int) -> bytes:
    return rng.choice(GENERATORS)(rng, known, num_pages)


def goodbye() -> bytes:
    return _CODEC.encode(Goodbye(reason="fuzz"))
