"""Every wire message survives encode -> decode unchanged, in the direction it travels."""

from __future__ import annotations

import msgspec
import pytest

from shared.ids import ids_to_bytes
from shared.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Codec,
    Commit,
    CommitAck,
    Dispatch,
    ErrorCode,
    ErrorReply,
    Finished,
    FinishReason,
    Generated,
    Goodbye,
    Heartbeat,
    PageRequest,
    PagesGranted,
    PoolDescriptor,
    PromptLogprobs,
    Register,
    SamplingParams,
    Shutdown,
    Welcome,
    WorkerError,
)

RID = bytes(range(16))
TOKENS = ids_to_bytes(list(range(4096)))
PAGES = ids_to_bytes([3, 1, 4, 1, 5])
POOL = PoolDescriptor(
    kind="shm",
    num_layers=2,
    num_pages=64,
    page_size=16,
    num_kv_heads=1,
    head_dim=8,
    dtype="float32",
    shm_path="/dev/shm/x.kv",
    num_bytes=65536,
    generation=7,
)

TO_DAEMON = [
    Register(protocol_version=PROTOCOL_VERSION, pid=42, device="cuda:1", max_running=8, model="m", name="w1"),
    Heartbeat(num_running=3, num_waiting=1, kv_tokens_in_use=100),
    Commit(request_id=RID, tokens=TOKENS, page_ids=PAGES),
    PageRequest(request_id=RID, num_pages=4),
    Generated(request_id=RID, tokens=ids_to_bytes([7, 8])),
    PromptLogprobs(
        request_id=RID, logprobs=b"\x00" * 8, top_ids=ids_to_bytes([1, 2]), top_logprobs=b"\x00" * 8
    ),
    Finished(
        request_id=RID, reason=FinishReason.STOP, tokens=TOKENS[:64], page_ids=PAGES[:4], stop_text="\n\n"
    ),
    WorkerError(code=ErrorCode.INTERNAL, message="oom", request_id=RID),
    Goodbye(reason="scale down"),
]
TO_WORKER = [
    Welcome(
        protocol_version=PROTOCOL_VERSION,
        worker_id=3,
        pool=POOL,
        model="m",
        heartbeat_interval_s=0.5,
        decode_page_chunk=4,
    ),
    Welcome(
        protocol_version=PROTOCOL_VERSION,
        worker_id=4,
        pool=PoolDescriptor(
            kind="cuda_ipc",
            num_layers=1,
            num_pages=2,
            page_size=16,
            num_kv_heads=1,
            head_dim=8,
            dtype="bfloat16",
            ipc_handle=bytes(64),
            device_index=1,
            device_uuid="GPU-1",
        ),
        model="m",
        heartbeat_interval_s=1.0,
        decode_page_chunk=1,
    ),
    Dispatch(
        request_id=RID,
        tokens=TOKENS,
        matched_len=32,
        prefix_page_ids=PAGES[:8],
        new_page_ids=PAGES[8:],
        sampling=SamplingParams(max_tokens=5, temperature=0.0, stop=["x"], stop_token_ids=[2], seed=1),
        attempt=2,
    ),
    CommitAck(request_id=RID, page_ids=PAGES),
    PagesGranted(request_id=RID, page_ids=PAGES),
    Abort(request_id=RID, reason="client gone"),
    Shutdown(reason="bye"),
    ErrorReply(code=ErrorCode.BAD_PAGES, message="no", request_id=RID),
]


@pytest.mark.parametrize("msg", TO_DAEMON, ids=lambda m: type(m).__name__)
def test_worker_to_daemon_round_trip(msg: object) -> None:
    codec = Codec()
    assert codec.decode_from_worker(codec.encode(msg)) == msg  # type: ignore[arg-type]


@pytest.mark.parametrize("msg", TO_WORKER, ids=lambda m: f"{type(m).__name__}")
def test_daemon_to_worker_round_trip(msg: object) -> None:
    codec = Codec()
    assert codec.decode_from_daemon(codec.encode(msg)) == msg  # type: ignore[arg-type]


def test_every_message_type_is_covered() -> None:
    from shared.protocol import DaemonToWorker, WorkerToDaemon

    assert {type(m) for m in TO_DAEMON} == set(WorkerToDaemon.__args__)
    assert {type(m) for m in TO_WORKER} == set(DaemonToWorker.__args__)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\x00garbage",
        msgspec.msgpack.encode({"type": "nope"}),
        msgspec.msgpack.encode({"type": "heartbeat", "num_running": "x", "num_waiting": 0}),
        Codec().encode(Shutdown()),
    ],
    ids=["garbage", "unknown-tag", "wrong-type", "wrong-direction"],
)
def test_malformed_frames_raise_typed_errors(data: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        Codec().decode_from_worker(data)
