"""Control-path benchmark: a worker's Commit or PageRequest and the daemon's reply over ZeroMQ ipc://.

Four worker processes (DEALER) each hold a 4096-token request dispatched by a real in-process Daemon
(uvloop) and send, closed loop, alternately Commit(all 4096 tokens, 256 pages) and PageRequest(1);
every reply is awaited before the next send. Reported: round-trip p50/p99 in microseconds over all
workers (time.perf_counter_ns around a blocking send + recv, the first 0.3 s excluded), and control
messages per second (the sum of each worker's replies / its measured window; the windows overlap).

Baseline in the same run: the same four processes round-trip a msgpack *list* of 4096 ints through a
ROUTER that decodes it and answers with a list (what the protocol would cost without raw int32 bytes),
served the straightforward way: a zmq.asyncio recv_multipart / send_multipart loop.
Transport floor in the same run: the same processes send frames of the Commit's and PageRequest's
sizes to a blocking ROUTER that answers each with a CommitAck-sized frame, nothing decoded (what
ZeroMQ ipc:// plus the client loop cost on this machine, with no daemon at all).
OS floor in the same run (bench.wakeup_floor): a one-byte pipe round trip between two processes, on any
CPU and pinned to one CPU: what a cross-process wake-up costs on this host before any ZeroMQ or Python.

    python -m bench.control_bench [--json] [--seconds 3] [--workers 4]
With --json the last line printed is one JSON object with p50_us, p99_us, msgs_per_s (daemon path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import zmq

PROMPT_LEN = 4096
PAGE = 16
# Encoded sizes of the daemon path's messages and replies (16-byte request ids): Commit of 4096 tokens and
# 256 pages -> CommitAck, PageRequest(1) -> PagesGranted; the transport floor sends and answers these.
COMMIT_BYTES, ACK_BYTES, PAGE_REQUEST_BYTES, GRANT_BYTES = 17_472, 1_082, 59, 64


# ---------------------------------------------------------------------------------------- worker side


def run_worker(endpoint: str, mode: str, seconds: float, out: Path, index: int) -> None:
    from shared.ids import ids_to_bytes
    from shared.protocol import PROTOCOL_VERSION, Codec, Commit, Dispatch, PageRequest, Register

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    codec = Codec()
    if mode == "baseline":
        payload = msgspec.msgpack.encode(list(range(index, index + PROMPT_LEN)))
        frames = [payload, payload]
    elif mode == "echo":
        frames = [bytes(COMMIT_BYTES), bytes(PAGE_REQUEST_BYTES)]
    else:
        sock.send(
            codec.encode(
                Register(
                    protocol_version=PROTOCOL_VERSION,
                    pid=os.getpid(),
                    device="cpu",
                    max_running=1,
                    model="bench",
                )
            )
        )
        codec.decode_from_daemon(sock.recv())  # Welcome
        dispatch = codec.decode_from_daemon(sock.recv())
        assert isinstance(dispatch, Dispatch)
        pages = np.frombuffer(dispatch.new_page_ids, dtype="<i4")[: PROMPT_LEN // PAGE]
        commit = codec.encode(
            Commit(request_id=dispatch.request_id, tokens=dispatch.tokens, page_ids=ids_to_bytes(pages))
        )
        page_req = codec.encode(PageRequest(request_id=dispatch.request_id, num_pages=1))
        frames = [commit, page_req]
    samples = np.empty(4_000_000, dtype=np.int64)  # round trips in ns; far more than a run produces
    clock = time.perf_counter_ns
    send, recv = sock.send, sock.recv
    check_errors = mode == "daemon"
    warmup_end = clock() + 300_000_000  # the first 0.3 s warm up caches, allocators and the daemon's tree
    end = warmup_end + int(seconds * 1e9)
    i = n = 0
    window_start = window_end = cpu_start = 0
    while True:
        t0 = clock()
        if t0 >= end:
            break
        send(frames[i & 1])
        reply = recv()
        t1 = clock()
        if check_errors and b"error" in reply[:16]:
            raise RuntimeError(f"daemon replied with an error: {codec.decode_from_daemon(reply)}")
        if t0 >= warmup_end:
            if n == 0:
                window_start, cpu_start = t0, time.process_time_ns()
            samples[n] = t1 - t0
            n += 1
            window_end = t1
        i += 1
    # Per-worker rate over its own measured window; the workers' windows overlap almost entirely.
    window_s = (window_end - window_start) / 1e9
    cpu_s = (time.process_time_ns() - cpu_start) / 1e9  # this process's threads, its ZeroMQ I/O thread too
    np.save(out, samples[:n])
    out.with_suffix(".json").write_text(json.dumps({"num_msgs": n, "window_s": window_s, "cpu_s": cpu_s}))
    sock.close()
    ctx.term()


# ---------------------------------------------------------------------------------------- daemon side


def _spawn_workers(
    endpoint: str, mode: str, n: int, seconds: float, tmp: Path
) -> list[subprocess.Popen[bytes]]:
    cmd = [
        sys.executable,
        "-m",
        "bench.control_bench",
        "--worker",
        endpoint,
        "--mode",
        mode,
        "--seconds",
        str(seconds),
    ]
    return [
        subprocess.Popen([*cmd, "--out", str(tmp / f"{mode}-{i}.npy"), "--index", str(i)]) for i in range(n)
    ]


def _collect(procs: list[subprocess.Popen[bytes]], mode: str, tmp: Path) -> dict[str, float]:
    parts: list[np.ndarray] = []
    msgs_per_s = cpu_s = 0.0
    for i, proc in enumerate(procs):
        if proc.wait() != 0:
            raise RuntimeError(f"{mode} worker {i} failed")
        parts.append(np.load(tmp / f"{mode}-{i}.npy"))
        meta = json.loads((tmp / f"{mode}-{i}.json").read_text())
        msgs_per_s += meta["num_msgs"] / meta["window_s"]
        cpu_s += meta["cpu_s"]
    samples_us = np.concatenate(parts) / 1000.0
    p50, p99 = np.percentile(samples_us, [50, 99])
    return {
        "p50_us": round(float(p50), 1),
        "p99_us": round(float(p99), 1),
        "msgs_per_s": round(msgs_per_s),
        "num_msgs": len(samples_us),
        "worker_cpu_us_per_msg": round(cpu_s / len(samples_us) * 1e6, 1),
    }


async def bench_baseline(n: int, seconds: float, tmp: Path) -> dict[str, float]:
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{tmp}/baseline.sock"
    sock.bind(endpoint)
    procs = _spawn_workers(endpoint, "baseline", n, seconds, tmp)
    encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode

    async def serve() -> None:
        while True:
            identity, data = await sock.recv_multipart()
            ids = decode(data)
            await sock.send_multipart([identity, encode(ids[: PROMPT_LEN // PAGE])])

    task = asyncio.create_task(serve())
    while any(p.poll() is None for p in procs):
        await asyncio.sleep(0.05)
    task.cancel()
    sock.close(linger=0)
    ctx.term()
    return _collect(procs, "baseline", tmp)


def bench_echo(n: int, seconds: float, tmp: Path) -> dict[str, float]:
    """The transport floor: a blocking ROUTER that answers each frame with a reply of the daemon's size for
    it, no decoding."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{tmp}/echo.sock"
    sock.bind(endpoint)
    procs = _spawn_workers(endpoint, "echo", n, seconds, tmp)
    ack, grant = bytes(ACK_BYTES), bytes(GRANT_BYTES)
    while any(p.poll() is None for p in procs):
        if sock.poll(50):
            identity, data = sock.recv_multipart()
            sock.send_multipart([identity, ack if len(data) == COMMIT_BYTES else grant])
    sock.close(linger=0)
    ctx.term()
    return _collect(procs, "echo", tmp)


async def bench_daemon(n: int, seconds: float, tmp: Path) -> dict[str, float]:
    from cachemgr.cache import Namespace, PrefixCache
    from cachemgr.daemon import Daemon, DaemonSettings
    from shared.kv_layout import KVLayout
    from shared.pool import create_pool
    from shared.protocol import SamplingParams

    # Tiny pages (128 B): the bench measures the control path, not memory; room for every PageRequest.
    layout = KVLayout(num_layers=1, num_pages=400_000, page_size=PAGE, num_kv_heads=1, head_dim=1)
    pool = create_pool(layout, "shm", name=f"bench-{os.getpid()}")
    settings = DaemonSettings(
        endpoint=f"ipc://{tmp}/workers.sock",
        heartbeat_interval_s=30,
        heartbeat_timeout_s=120,
        worker_hung_timeout_s=120,
    )
    cache = PrefixCache(layout.num_pages, page_size=PAGE)
    daemon = Daemon(
        cache=cache, pool=pool.descriptor(), settings=settings, model_name="bench", max_context_len=1 << 20
    )
    await daemon.start()
    try:
        procs = _spawn_workers(daemon.endpoint, "daemon", n, seconds, tmp)
        while daemon.stats()["workers"] < n:
            await asyncio.sleep(0.01)
        streams = [
            await daemon.submit(
                Namespace("bench"),
                (np.arange(PROMPT_LEN) + 7919 * i) % 50_000,
                SamplingParams(max_tokens=1 << 19),
            )
            for i in range(n)
        ]
        # The daemon's own CPU (all its threads) over most of the workers' measured window.
        await asyncio.sleep(0.35)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(max(seconds - 0.2, 0.1))
        cpu1, wall1 = time.process_time(), time.perf_counter()
        while any(p.poll() is None for p in procs):
            await asyncio.sleep(0.05)
        result = _collect(procs, "daemon", tmp)
        utilization = (cpu1 - cpu0) / (wall1 - wall0)
        result["daemon_cpu_cores"] = round(utilization, 2)
        result["daemon_cpu_us_per_msg"] = round(utilization / result["msgs_per_s"] * 1e6, 1)
        daemon.check()
        for stream in streams:
            stream.abort()
        return result
    finally:
        await daemon.stop()
        pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per phase")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="daemon", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.mode, args.seconds, Path(args.out), args.index)
        return
    import uvloop

    from bench.wakeup_floor import measure as measure_wakeup

    wakeup = measure_wakeup(min(args.seconds, 1.0))
    with tempfile.TemporaryDirectory(prefix="radixkv-bench-") as tmp:
        floor = bench_echo(args.workers, args.seconds, Path(tmp))
        baseline = uvloop.run(bench_baseline(args.workers, args.seconds, Path(tmp)))
        result = uvloop.run(bench_daemon(args.workers, args.seconds, Path(tmp)))
    one_cpu = wakeup.get("one_cpu", {}).get("p50_us")
    print(
        f"OS floor, one-byte pipe round trip between two processes: p50 {wakeup['any_cpu']['p50_us']} us "
        f"(any CPU), {one_cpu} us (both on one CPU)"
    )
    print(
        f"transport floor, blocking ROUTER echo ({args.workers} workers): p50 {floor['p50_us']} us, p99 {floor['p99_us']} us, {floor['msgs_per_s']} msgs/s"
    )
    print(
        f"naive msgpack-list round trip ({args.workers} workers): p50 {baseline['p50_us']} us, p99 {baseline['p99_us']} us, {baseline['msgs_per_s']} msgs/s"
    )
    print(
        f"daemon Commit/PageRequest round trip ({args.workers} workers): p50 {result['p50_us']} us, p99 {result['p99_us']} us, {result['msgs_per_s']} msgs/s"
    )
    print(
        f"CPU per message: daemon {result['daemon_cpu_us_per_msg']} us ({result['daemon_cpu_cores']} cores busy), "
        f"workers {result['worker_cpu_us_per_msg']} us; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"speedup over baseline: p50 {baseline['p50_us'] / result['p50_us']:.1f}x, p99 {baseline['p99_us'] / result['p99_us']:.1f}x"
    )
    if args.json:
        extra = {"workers": args.workers, "prompt_len": PROMPT_LEN, "cpus": len(os.sched_getaffinity(0))}
        extra["loadavg_1m"] = round(os.getloadavg()[0], 2)
        print(
            json.dumps(
                {**result, **extra, "baseline": baseline, "transport_floor": floor, "os_floor": wakeup}
            )
        )


if __name__ == "__main__":
    main()
