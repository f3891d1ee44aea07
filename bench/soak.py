"""Soak test (not in CI): sustained multi-turn load against `cachemgr up` for N minutes.

    python -m bench.soak                                    # 30 minutes, embedded SmolLM2, 2 workers
    python -m bench.soak --minutes 3 --tiny-model --tag 3min_tiny   # bench/results/soak_3min_tiny.*

Every `--interval` seconds (default 10) it samples the resident memory of every process (daemon, each
worker, this client), the daemon's page counts and counters (admin socket `stats`), and the latency,
time to first token and errors of the requests that ended in that interval. The load: `--clients`
multi-turn conversations over one shared system prefix (each turn = the whole history plus a new user
message, restarted after `--turns` turns), plus one client sending distinct one-off prompts so that the
pool stays full and eviction runs all the time. At the end it runs the admin `check` (the cache
invariant) on the loaded daemon, stops the stack and checks that nothing is left behind.

Writes bench/results/soak_<tag>.json and soak_<tag>.png. The figures are this machine's, under whatever
else runs on it: the JSON records the CPU count and load average next to each sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.random_model import LlamaShape, write_model_dir
from bench.serve_client import Result, complete, percentile, random_tokens
from cachemgr.admin.client import AdminClient
from cachemgr.launcher import StackConfig, Supervisor, free_port

RESULTS = Path(__file__).resolve().parent / "results"
TINY = LlamaShape(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
)


def rss_mib(pid: int) -> float | None:
    """VmRSS of a live process in MiB (Linux /proc); None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class Window:
    """Requests that ended since the last sample."""

    results: list[Result] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def take(self) -> tuple[list[Result], list[str]]:
        out = (self.results, self.errors)
        self.results, self.errors = [], []
        return out


async def conversation_client(
    http: aiohttp.ClientSession, args: argparse.Namespace, url: str, model: str,
    system: list[int], index: int, window: Window, stop: asyncio.Event,
) -> None:  # fmt: skip
    rng = random.Random(1000 + index)
    history: list[int] = []
    turn = 0
    while not stop.is_set():
        if turn == args.turns:
            history, turn = [], 0
        prompt = [*system, *history, *random_tokens(rng, rng.randrange(20, 60), args.vocab)]
        try:
            result = await complete(http, url, model, prompt, args.max_tokens, salt="")
        except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            window.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            history, turn = [], 0
            await asyncio.sleep(0.5)
            continue
        window.results.append(result)
        # The reply's token ids are not in the stream; the next turn repeats the prompt (cached) and
        # stands in for the reply with fresh tokens of the same length, as an uncached suffix would.
        history = [*prompt[len(system) :], *random_tokens(rng, result.completion_tokens, args.vocab)]
        turn += 1


async def scanner_client(
    http: aiohttp.ClientSession, args: argparse.Namespace, url: str, model: str, window: Window,
    stop: asyncio.Event,
) -> None:  # fmt: skip
    """Distinct one-off prompts: nothing to hit, everything to evict later."""
    rng = random.Random(7)
    while not stop.is_set():
        try:
            result = await complete(http, url, model, random_tokens(rng, args.scan_len, args.vocab), 4, "")
            window.results.append(result)
        except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            window.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            await asyncio.sleep(0.5)


def processes(supervisor: Supervisor) -> dict[str, int]:
    return {c.name: c.proc.pid for c in supervisor.children if c.proc is not None and c.running}


def sample(supervisor: Supervisor, admin: AdminClient, window: Window, t: float, dt: float) -> dict:
    results, errors = window.take()
    stats = admin.call("stats")
    ttfts = [r.ttft_s for r in results]
    latencies = [r.latency_s for r in results]
    rss = {name: rss_mib(pid) for name, pid in processes(supervisor).items()}
    rss["soak_client"] = rss_mib(os.getpid())
    return {
        "t_s": round(t, 1),
        "rss_mib": {k: round(v, 1) for k, v in rss.items() if v is not None},
        "pids": processes(supervisor),
        "restarts": {c.name: c.num_restarts for c in supervisor.children},
        "cache": stats["cache"],
        "daemon": {k: v for k, v in stats["daemon"].items() if k != "endpoint"},
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "requests_per_s": round(len(results) / dt, 3),
        "output_tokens_per_s": round(sum(r.completion_tokens for r in results) / dt, 1),
        "hit_rate": round(
            sum(r.cached_tokens for r in results) / max(1, sum(r.prompt_tokens for r in results)), 4
        ),
        "ttft_p50_ms": round(percentile(ttfts, 0.5) * 1e3, 1) if ttfts else None,
        "ttft_p99_ms": round(percentile(ttfts, 0.99) * 1e3, 1) if ttfts else None,
        "latency_p50_ms": round(percentile(latencies, 0.5) * 1e3, 1) if latencies else None,
        "latency_p99_ms": round(percentile(latencies, 0.99) * 1e3, 1) if latencies else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


async def soak(args: argparse.Namespace, supervisor: Supervisor, admin: AdminClient) -> list[dict]:
    url = supervisor.config.url
    window, stop = Window(), asyncio.Event()
    samples: list[dict] = []
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(url + "/v1/models") as resp:
            model = (await resp.json())["data"][0]["id"]
        system = random_tokens(random.Random(1), args.system_len, args.vocab)
        tasks = [
            asyncio.ensure_future(conversation_client(http, args, url, model, system, i, window, stop))
            for i in range(args.clients)
        ]
        tasks.append(asyncio.ensure_future(scanner_client(http, args, url, model, window, stop)))
        start = last = time.monotonic()
        end = start + args.minutes * 60
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(1.0, end - now))
            supervisor.poll()  # restart a child that died (counted in the samples)
            now = time.monotonic()
            if now - last >= args.interval or now >= end:
                s = await asyncio.to_thread(sample, supervisor, admin, window, now - start, now - last)
                samples.append(s)
                last = now
                print(
                    json.dumps({k: s[k] for k in ("t_s", "rss_mib", "requests", "errors", "latency_p99_ms")})
                )
        stop.set()
        for task in tasks:  # in-flight requests are dropped: the daemon aborts them (client gone)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return samples


def wait_idle(admin: AdminClient, timeout_s: float) -> dict:
    """Cache stats once no request runs and no lease is left (the aborted in-flight ones included)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = admin.call("stats")
        if stats["daemon"]["running"] == 0 and stats["cache"]["num_leases"] == 0:
            return stats["cache"]
        if time.monotonic() > deadline:
            raise RuntimeError(f"not idle {timeout_s:.0f} s after the load stopped: {stats}")
        time.sleep(0.2)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    ax = axes[0][0]
    for name in sorted({n for s in samples for n in s["rss_mib"]}):
        ax.plot(t, [s["rss_mib"].get(name) for s in samples], label=name)
    ax.set(title="resident memory (MiB)", ylim=(0, None))
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for key in ("free", "cached", "leased"):
        ax.plot(t, [s["cache"][key] for s in samples], label=key)
    ax.set(title=f"KV pages (pool {samples[0]['cache']['num_pages']})")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    for key in ("latency_p50_ms", "latency_p99_ms", "ttft_p50_ms", "ttft_p99_ms"):
        ax.plot(t, [s[key] for s in samples], label=key.removesuffix("_ms"))
    ax.set(title="per interval (ms)", xlabel="minutes", ylim=(0, None))
    ax.legend(fontsize=8)
    ax = axes[1][1]
    ax.plot(t, [s["requests_per_s"] for s in samples], label="requests/s")
    ax.plot(t, [s["errors"] for s in samples], label="errors")
    ax.set(title="requests/s, errors; token hit rate (right)", xlabel="minutes", ylim=(0, None))
    ax.legend(fontsize=8, loc="upper left")
    rate = ax.twinx()
    rate.plot(t, [s["hit_rate"] for s in samples], color="tab:green", label="token hit rate")
    rate.set(ylim=(0, 1))
    rate.legend(fontsize=8, loc="upper right")
    fig.suptitle(report["label"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--model", default=None, help="HF dir or GGUF (default: embedded SmolLM2)")
    p.add_argument(
        "--tiny-model",
        action="store_true",
        help="a small random-weight Llama (bench.random_model, TINY) instead of --model: the stack's own "
        "costs dominate, not the model's",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--num-pages", type=int, default=256, help="KV pages of 16 tokens: few, so eviction runs")
    p.add_argument("--clients", type=int, default=4, help="concurrent multi-turn conversations")
    p.add_argument("--turns", type=int, default=6, help="turns before a conversation starts over")
    p.add_argument("--system-len", type=int, default=256, help="shared system prefix tokens")
    p.add_argument("--scan-len", type=int, default=160, help="tokens of each one-off prompt")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1000, help="prompt ids are drawn from [3, vocab)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="output name: soak_<tag>.json/.png (default: <minutes>min)")
    args = p.parse_args(argv)
    tag = args.tag or f"{args.minutes:g}min"
    if args.tiny_model:
        model_name = f"tiny random-weight Llama ({TINY.num_hidden_layers} layers, hidden {TINY.hidden_size})"
    else:
        model_name = args.model or "SmolLM2-135M-Instruct (embedded)"
    with tempfile.TemporaryDirectory(prefix="radixkv-soak-") as tmp:
        config = StackConfig(
            num_workers=args.workers,
            model=str(write_model_dir(Path(tmp) / "tiny", TINY, name="tiny-random"))
            if args.tiny_model
            else args.model,
            http_port=free_port(),
            run_dir=Path(tmp) / "run",
            log_dir=Path(tmp) / "logs",
            daemon_args=(f"--num-pages={args.num_pages}",),
            worker_args=("--random-weights",) if args.tiny_model else (),
        )
        supervisor = Supervisor(config)
        supervisor.start()
        try:
            supervisor.wait_ready(min_workers=args.workers)
            with AdminClient(path=config.run_dir / "admin.sock", timeout_s=30) as admin:
                started = time.strftime("%Y-%m-%d %H:%M:%S")
                samples = asyncio.run(soak(args, supervisor, admin))
                idle = wait_idle(admin, timeout_s=60.0)
                check = admin.call("check")
                admin.call("flush")
                flushed = admin.call("stats")["cache"]
            daemon_pid = supervisor.daemon.proc.pid if supervisor.daemon.proc else 0
        finally:
            supervisor.stop()
        leftovers = sorted(p.name for p in config.run_dir.iterdir())
        shm_left = Path(f"/dev/shm/radixkv-{os.getuid()}-{daemon_pid}.kv").exists()
    first, last = samples[0], samples[-1]
    report = {
        "label": f"soak, {args.minutes:g} min ({started}), {args.workers} workers, model "
        f"{model_name}, {args.num_pages} pages, {os.cpu_count()} CPUs",
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpu_count": os.cpu_count(),
        "started": started,
        "check_at_end": check,
        "idle_after_load": {k: idle[k] for k in ("free", "cached", "leased", "locked", "num_leases")},
        "after_flush": {k: flushed[k] for k in ("num_pages", "free", "cached", "leased")},
        "leftovers_after_stop": {"run_dir": leftovers, "shm_pool": shm_left},
        "summary": {
            "requests": sum(s["requests"] for s in samples),
            "errors": sum(s["errors"] for s in samples),
            "evictions": last["cache"]["evictions"],
            "restarts": last["restarts"],
            "rss_mib_first_sample": first["rss_mib"],
            "rss_mib_last_sample": last["rss_mib"],
            "latency_p99_ms_max_interval": max((s["latency_p99_ms"] or 0) for s in samples),
        },
        "samples": samples,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"soak_{tag}.json").write_text(json.dumps(report, indent=1, default=str))
    plot(report, args.out_dir / f"soak_{tag}.png")
    print(json.dumps(report["summary"], indent=1))
    clean = (
        idle["leased"] == idle["locked"] == idle["num_leases"] == 0
        and flushed["free"] == flushed["num_pages"]
    )
    return 0 if check.get("healthy") and clean and not report["summary"]["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
