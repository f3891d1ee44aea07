"""The daemon's mutable bookkeeping: workers, requests and wake-up signals. Loop thread only."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from cachemgr.daemon.stream import RequestStream
from shared.ids import ID_DTYPE
from shared.protocol import SamplingParams


def pack_ids(ids: np.ndarray) -> bytes:
    """Wire bytes of an integer array the daemon produced itself (no range checks: the hot path)."""
    return ids.astype(ID_DTYPE, copy=False).tobytes()


class Signal:
    """Wakes every current waiter at once; waiters re-check their own condition afterwards.

    Read ``current()`` *before* checking the condition (no await in between), then wait on it, so a
    notify that lands between the check and the wait is never lost.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


async def wait_until(event: asyncio.Event, deadline: float) -> bool:
    """Wait for ``event`` until the monotonic ``deadline``. Returns False on timeout."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    try:
        await asyncio.wait_for(event.wait(), remaining)
    except TimeoutError:
        return False
    return True


@dataclass(slots=True, eq=False)
class WorkerState:
    """One registered worker connection (keyed by its ZeroMQ identity)."""

    worker_id: int
    identity: bytes
    pid: int
    device: str
    max_running: int
    name: str
    model: str
    registered_at: float
    last_seen: float
    same_pid_namespace: bool = False  # its pid can be checked from here (shared.process_identity)
    request_ids: set[bytes] = field(default_factory=set)  # dispatched here and not finished
    reported_running: int = 0
    reported_waiting: int = 0
    steps_done: int = 0  # last Heartbeat.steps_done
    ready: bool = True  # takes requests (False from registration until it has warmed up)
    progress_at: float = 0.0  # monotonic time of the last sign of progress (see DaemonSettings)

    @property
    def has_capacity(self) -> bool:
        return len(self.request_ids) < self.max_running


@dataclass(slots=True, eq=False)
class RequestState:
    """One accepted request, from submit until its stream ends and its lease is released.

    Token ranges of the current attempt::

        prompt            generated (streamed to the client)
        |<-- prompt_len -->|<-- len(generated) -->|
        |<------ dispatched as this attempt's tokens ---->| (a re-dispatch resumes after the streamed ones)
    """

    request_id: bytes
    namespace: object
    prompt: np.ndarray  # int32
    sampling: SamplingParams
    stream: RequestStream
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    worker: WorkerState | None = None
    lease_id: int | None = None
    attempt: int = 0
    first_token_at: float | None = None
    aborted: bool = False
    admit_task: asyncio.Task[None] | None = None
    abort_timer: asyncio.TimerHandle | None = None
    prompt_bytes: bytes = b""  # the prompt as little-endian int32, for byte-wise commit checks
    prompt_scored: bool = False  # its PromptLogprobs reached the stream (a re-dispatch skips them)

    def __post_init__(self) -> None:
        self.prompt_bytes = self.prompt.tobytes()

    def known_bytes(self, length: int) -> bytes:
        """known_tokens(length) as wire bytes; the common case (within the prompt) is one slice."""
        if length <= len(self.prompt):
            return self.prompt_bytes[: 4 * length]
        return self.known_tokens(length).tobytes()

    def known_tokens(self, length: int) -> np.ndarray:
        """The first ``length`` tokens of prompt + generated (ValueError if fewer are known)."""
        if length <= len(self.prompt):
            return self.prompt[:length]
        if length > len(self.prompt) + len(self.generated):
            raise ValueError(f"only {len(self.prompt) + len(self.generated)} tokens are known, not {length}")
        extra = np.asarray(self.generated[: length - len(self.prompt)], dtype=np.int32)
        return np.concatenate([self.prompt, extra])
