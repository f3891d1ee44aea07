"""Commit ordering on a GPU, and what one engine step reports.

Kernels run asynchronously: when `Engine.step` returns, the K/V it wrote may still be in flight. A page
must not reach the radix tree (Commit, Finished) before the kernels that wrote it have completed, or
another worker could read half-written K/V. So the engine records a fence after every forward pass and a
Commit / Finished leaves the outbox only once the latest fence recorded before it has completed:

    step N:  forward (writes pages) ─ record fence N ─ sample ─ queue Commit(fence N)
    driver:  take_messages() releases the outbox up to the first message whose fence is not done;
             the rest waits (the runtime waits on that fence in a helper thread, never the compute one)

On CPU there is no fence (the forward is synchronous); tests pass their own fence factory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Fence(Protocol):
    """A point in a device stream. torch.cuda.Event after record() is one."""

    def query(self) -> bool:
        """Whether everything queued before the fence has completed (never blocks)."""
        ...

    def synchronize(self) -> None:
        """Block the calling thread until `query()` would be True."""
        ...


def cuda_fence_factory(device: torch.device) -> Callable[[], Fence]:
    """A factory recording a CUDA event on `device`'s current stream each time it is called."""

    def record() -> Fence:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    return record


@dataclass(frozen=True, slots=True)
class StepStats:
    """One forward step as the engine saw it (wall time, batch building to sampled tokens), and where
    that time went on the host: building the batch, issuing the forward (on CUDA it returns before the
    kernels finish), sampling (on CUDA this waits for them: the step's one device sync); the rest of
    `seconds` is bookkeeping after sampling (tokens accepted, messages queued)."""

    num_seqs: int
    num_tokens: int
    num_prefill_tokens: int  # tokens of sequences still in their prompt
    num_cached_tokens: int  # positions already in the pool that the batch attends over
    seconds: float
    # Breakdown of `seconds` (left out of equality: two stats describe the same step whatever the split).
    build_s: float = field(default=0.0, compare=False)
    forward_s: float = field(default=0.0, compare=False)
    sample_s: float = field(default=0.0, compare=False)
