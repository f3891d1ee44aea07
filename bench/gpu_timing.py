"""Timing helpers shared by the GPU benchmarks: device-event medians, run metadata, ceilings.

Everything here needs CUDA; nothing runs at import time."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import platform
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import msgspec
import torch

from shared.kv_layout import KVLayout


def time_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 20, inner: int = 1) -> float:
    """Median milliseconds of one call of `fn`, timed with device events around `inner` back-to-back
    calls (inner > 1 keeps the queue full, so host launch time between short kernels drops out)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def graph_us(fn: Callable[[], object], calls: int, reps: int = 20) -> float:
    """Median us per call of `fn` (which makes `calls` calls, e.g. one GEMM per layer over distinct
    weights) captured in one CUDA graph and replayed `reps` times."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def host_issue_ms(fn: Callable[[], object], reps: int = 10) -> float:
    """Median host milliseconds to enqueue one call of `fn` (no wait for the GPU): when it is close to the
    device time, the call is bound by Python and kernel launches, not by the GPU."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def run_metadata() -> dict[str, object]:
    """Card, software versions, date and the command line: what every result file carries."""
    import flashinfer

    props = torch.cuda.get_device_properties(0)
    return {
        "card": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "flashinfer": flashinfer.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def matmul_tflops(n: int = 8192, sets: int = 3) -> float:
    """bf16 n x n x n matmul rate on random data, rotating among `sets` operand pairs (beyond L2)."""
    a = [torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(sets)]
    b = [torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(sets)]
    out = torch.empty(n, n, dtype=torch.bfloat16, device="cuda")
    state = {"i": 0}

    def step() -> None:
        i = state["i"] = (state["i"] + 1) % sets
        torch.matmul(a[i], b[i], out=out)

    ms = time_ms(step, warmup=5, reps=30)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_tbps(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read plus bytes written."""
    src = torch.randn(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * num_bytes / (ms * 1e-3) / 1e12


def _own_pool(layout: KVLayout, conn: Connection) -> None:
    from shared.pool import create_pool

    pool = create_pool(layout, "cuda_ipc", name="bench", device=0)
    conn.send_bytes(msgspec.msgpack.encode(pool.descriptor()))
    conn.recv()  # the benchmark is done with it
    pool.close()
    conn.send("closed")


class IpcPoolOwner:
    """A child process that owns a CUDA IPC pool, as the daemon does; `descriptor` maps it here."""

    def __init__(self, layout: KVLayout) -> None:
        from shared.protocol import PoolDescriptor

        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_own_pool, args=(layout, child_conn), daemon=True)
        self._proc.start()
        if not self._conn.poll(120):
            raise RuntimeError("pool owner did not start")
        self.descriptor = msgspec.msgpack.decode(self._conn.recv_bytes(), type=PoolDescriptor)

    def close(self) -> None:
        self._conn.send("close")
        self._conn.poll(60)
        self._proc.join(60)
