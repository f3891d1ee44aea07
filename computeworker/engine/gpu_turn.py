"""Turns on a shared GPU: worker processes on one device run their steps' kernels one at a time.

Two worker processes on one GPU hold two CUDA contexts, and without MPS the GPU runs one context at a
time. When both have kernels queued it time-slices between them: it preempts a running step for the
other context's, again and again, and both steps finish later than if they had run one after the
other (measured with two workers on an H200: 0.88x the throughput of one). A step is also host work
(building the batch, FlashInfer's plan, sampling), during which a lone worker's GPU idles.

So the workers on a device take turns: a worker takes the device's turn right before its step's first
kernel launch (after the batch is built and the attention planned on the host) and gives it back once
the step's results are on the host. The other worker builds and plans its next step meanwhile, so
the GPU runs one step after another, and each step runs alone, at the speed of one worker:

    worker A:  build+plan ─ [take] kernels ......... sync [give] ─ tokens out ─ build+plan ─ [take] ...
    worker B:      build+plan ─ (waits) ──────────────────── [take] kernels ......... sync [give] ─ ...
    GPU:                        A's step ─────────────────── B's step ─────────────── A's step ...

The turn is an exclusive `flock` on a file named after the device's UUID, in a directory every worker
of the device sees (/dev/shm by default; compose shares it with `ipc: host`). The kernel drops the
lock of a process that dies, so a crashed worker never keeps the turn. A worker alone on its device
takes an uncontended lock: two system calls a step.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

DEFAULT_TURN_DIR = Path("/dev/shm")


def turn_path(directory: Path, device_uuid: str) -> Path:
    """The turn file of a device: one per physical GPU, whatever index CUDA_VISIBLE_DEVICES gives it."""
    safe = "".join(c if c.isalnum() or c == "-" else "_" for c in device_uuid)
    if not safe:
        raise ValueError("device_uuid must not be empty")
    return directory / f"radixkv-gpu-{safe}.turn"


class GpuTurn:
    """This process's handle on a device's turn. `take` blocks until no other process holds the turn;
    both `take` and `give` are idempotent, so the model runner can take it at its first launch and the
    engine make sure (take) and hand it back (give) around the step.

    Counters (read by any thread): turns taken, how many of them waited for another process, and the
    seconds spent waiting. One thread uses a handle at a time (the worker's compute thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self._held = False
        self.turns = 0
        self.waits = 0
        self.wait_s = 0.0

    @property
    def held(self) -> bool:
        return self._held

    def take(self) -> None:
        if self._held:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            start = time.perf_counter()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            self.waits += 1
            self.wait_s += time.perf_counter() - start
        self._held = True
        self.turns += 1

    def give(self) -> None:
        if self._held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._held = False

    def close(self) -> None:
        if self._fd >= 0:
            self.give()
            os.close(self._fd)
            self._fd = -1
