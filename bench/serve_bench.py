"""The full stack (daemon + workers, real HTTP) on a random-weight model, against issue 7's targets.

    python -m bench.serve_bench --device cuda:0 --out bench/results/serve_bench.json     # Llama-3-8B shape
    python -m bench.serve_bench --device cpu --shape tiny --clients 4 --rounds 2 ...      # a CPU smoke run

Phases (bench/serve_client.py has the workloads):
  A  shared prefix, 1 worker: TTFT cold vs cached through HTTP, and the engine's own step time for the
     same requests (worker `--log-steps` lines: the cold step has prefix+question tokens and nothing
     cached, the hot one only the question over the cached prefix)
  B  multi-turn, 1 worker: with the cache, then without (a fresh cache_salt per request)
  C  shared groups: the same requests on 1 worker, then on 2 workers sharing the pool
Writes JSON (every target: measured, target, ceiling, met) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.random_model import LLAMA3_8B, LlamaShape, write_model_dir
from bench.serve_client import MultiTurn, complete, random_tokens, run_groups, run_multi_turn
from cachemgr.launcher import StackConfig, Supervisor, free_port

TINY = LlamaShape(1000, 256, 512, 2, 4, 2, 64, 32768, 10000.0, 1e-5)
_STEP = re.compile(r"step seqs=(\d+) tokens=(\d+) prefill=(\d+) cached=(\d+) ms=([\d.]+)")
# The worker's DEBUG trace of each step (computeworker.runtime): where the time from a Dispatch read to
# its messages handed to ZeroMQ went.
_TRACE_FIELDS = ("dispatch", "step", "build", "forward", "sample", "handoff", "send")
_TRACE = re.compile(
    r"trace tokens=(\d+) cached=(\d+) " + " ".join(rf"{f}_ms=(-?[\d.]+)" for f in _TRACE_FIELDS)
)
GIB = 1 << 30


def weight_bytes(shape: LlamaShape, read_only: bool = False) -> int:
    """bf16 bytes of the weights (read_only: what one forward reads; the embedding is gathered)."""
    layer = shape.hidden_size * (
        shape.num_attention_heads * shape.head_dim * 2
        + 2 * shape.num_key_value_heads * shape.head_dim
        + 3 * shape.intermediate_size
    )
    embed = shape.vocab_size * shape.hidden_size
    return 2 * (shape.num_hidden_layers * layer + embed * (1 if read_only else 2))


def kv_bytes_per_token(shape: LlamaShape, elem: int) -> int:
    return shape.num_hidden_layers * 2 * shape.num_key_value_heads * shape.head_dim * elem


class Stack:
    """A supervised stack with its worker logs; `steps(since)` parses --log-steps lines."""

    def __init__(
        self,
        args: argparse.Namespace,
        model_dir: Path,
        workers: int,
        budget: int,
        tmp: Path,
        extra_daemon_args: tuple[str, ...] = (),
    ) -> None:
        cuda = args.device.startswith("cuda")
        kv_dtype = "bfloat16" if cuda else "float32"
        tag = f"{workers}{''.join(a.strip('-')[0] for a in extra_daemon_args)}"
        self.log_dir = tmp / f"logs-{tag}"
        self.config = StackConfig(
            num_workers=workers,
            model=str(model_dir),
            http_port=free_port(),
            run_dir=tmp / f"run-{tag}",
            device=args.device,
            log_dir=self.log_dir,
            ready_timeout_s=600.0,
            daemon_args=(
                "--device", args.device, "--kv-dtype", kv_dtype, "--kv-budget", str(budget),
                "--max-queue", "100000", "--page-wait-timeout", "600", "--dispatch", args.dispatch,
                *extra_daemon_args,
            ),
            worker_args=(
                "--random-weights", "--dtype", kv_dtype, "--max-running", str(args.max_running),
                "--prefill-chunk", str(args.prefill_chunk), "--log-steps", "--log-level", "DEBUG",
                *(() if args.cuda_graphs else ("--no-cuda-graphs",)),
                *(() if args.mixed_steps is None else ("--mixed-steps" if args.mixed_steps else "--no-mixed-steps",)),
            ),
        )  # fmt: skip
        self.supervisor = Supervisor(self.config)
        self.workers = workers

    def __enter__(self) -> Stack:
        self.supervisor.start()
        self.supervisor.wait_ready(min_workers=self.workers)
        with urllib.request.urlopen(self.config.url + "/v1/models", timeout=10) as resp:
            self.model = json.loads(resp.read())["data"][0]["id"]
        return self

    def __exit__(self, *exc: object) -> None:
        self.supervisor.stop()

    def log_sizes(self) -> list[int]:
        return [(self.log_dir / f"worker-{i}.log").stat().st_size for i in range(self.workers)]

    def _log_since(self, i: int, offset: int) -> str:
        with open(self.log_dir / f"worker-{i}.log", "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def steps(self, since: list[int]) -> list[list[tuple[int, int, int, int, float]]]:
        """Per worker: (seqs, tokens, prefill, cached, ms) of every step logged after `since`."""
        out = []
        for i, offset in enumerate(since):
            text = self._log_since(i, offset)
            out.append([(int(a), int(b), int(c), int(d), float(e)) for a, b, c, d, e in _STEP.findall(text)])
        return out

    def traces(self, since: list[int]) -> list[tuple[int, int, dict[str, float]]]:
        """(tokens, cached, {field: ms}) of every worker step trace logged after `since`."""
        out = []
        for i, offset in enumerate(since):
            for m in _TRACE.findall(self._log_since(i, offset)):
                out.append((int(m[0]), int(m[1]), dict(zip(_TRACE_FIELDS, map(float, m[2:]), strict=True))))
        return out


def phase_a(stack: Stack, args: argparse.Namespace, vocab: int) -> dict:
    async def go() -> dict:
        import aiohttp

        rng = random.Random(7)
        prefix = random_tokens(rng, args.prefix_tokens, vocab)

        def text(ids: list[int]) -> str:  # bench.random_model's words: "w<id>" split on whitespace
            return " ".join(f"w{t}" for t in ids)

        url, model = stack.config.url, stack.model
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
            for i in range(2):  # first-call costs out of the way (both kernel shapes)
                await complete(
                    s, url, model, random_tokens(rng, args.prefix_tokens + 100, vocab), 2, f"warm{i}"
                )
            since = stack.log_sizes()
            cold = [
                await complete(
                    s, url, model, prefix + random_tokens(rng, args.question_tokens, vocab), 1, f"cold{i}"
                )
                for i in range(args.cold_reps)
            ]
            await complete(s, url, model, prefix + random_tokens(rng, args.question_tokens, vocab), 1, "hot")
            hot = [
                await complete(
                    s, url, model, prefix + random_tokens(rng, args.question_tokens, vocab), 1, "hot"
                )
                for _ in range(args.hot_reps)
            ]
            cold_text = [
                await complete(
                    s, url, model, text(prefix + random_tokens(rng, args.question_tokens, vocab)), 1,
                    f"coldtext{i}",
                )
                for i in range(args.cold_reps)
            ]  # fmt: skip
            hot_text = [
                await complete(
                    s, url, model, text(prefix + random_tokens(rng, args.question_tokens, vocab)), 1, "hot"
                )
                for _ in range(args.hot_reps)
            ]
        return {"cold": cold, "hot": hot, "cold_text": cold_text, "hot_text": hot_text, "since": since}

    got = asyncio.run(go())
    total = args.prefix_tokens + args.question_tokens
    steps = [s for w in stack.steps(got["since"]) for s in w]
    cold_ms = [ms for seqs, tok, _, cached, ms in steps if seqs == 1 and tok == total and cached == 0]
    hot_ms = [
        ms for seqs, tok, _, cached, ms in steps if seqs == 1 and tok == args.question_tokens and cached
    ]
    # Hot steps that started from a Dispatch (dispatch_ms >= 0): the worker's part of the cached TTFT.
    hot_traces = [
        t
        for tok, cached, t in stack.traces(got["since"])
        if tok == args.question_tokens and cached and t["dispatch"] >= 0
    ]
    cold_ttft = statistics.median(r.ttft_s for r in got["cold"])
    hot_ttft = statistics.median(r.ttft_s for r in got["hot"])

    def med(key: str, field: str) -> float:
        return round(statistics.median(getattr(r, field) for r in got[key]), 4)

    return {
        "prefix_tokens": args.prefix_tokens,
        "question_tokens": args.question_tokens,
        "ttft_cold_s": round(cold_ttft, 4),
        "ttft_cached_s": round(hot_ttft, 4),
        "ttft_cold_all_s": [round(r.ttft_s, 4) for r in got["cold"]],
        "ttft_cached_all_s": [round(r.ttft_s, 4) for r in got["hot"]],
        "cached_tokens_hot": [r.cached_tokens for r in got["hot"]],
        # Send -> response headers: parse, tokenize (text), match, lease and dispatch in the daemon.
        "headers_cold_s": med("cold", "headers_s"),
        "headers_cached_s": med("hot", "headers_s"),
        # The same prompts as text: the daemon tokenizes 10,100 words on the way in.
        "ttft_cold_text_s": med("cold_text", "ttft_s"),
        "ttft_cached_text_s": med("hot_text", "ttft_s"),
        "headers_cached_text_s": med("hot_text", "headers_s"),
        "ttft_cached_text_all_s": [round(r.ttft_s, 4) for r in got["hot_text"]],
        "cached_tokens_hot_text": [r.cached_tokens for r in got["hot_text"]],
        "forward_cold_ms": round(statistics.median(cold_ms), 3) if cold_ms else None,
        "forward_cached_ms": round(statistics.median(hot_ms), 3) if hot_ms else None,
        "worker_trace_cached_ms": {
            f: round(statistics.median(t[f] for t in hot_traces), 3) for f in _TRACE_FIELDS
        }
        if hot_traces
        else None,
        "forward_cold_all_ms": cold_ms,
        "forward_cached_all_ms": hot_ms,
    }


def measure_copy_bandwidth(device: str) -> float | None:
    """Device-to-device copy, bytes read + written per second (the bandwidth ceiling); None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    rate = 2 * 20 * src.numel() / (start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return rate


def plan_memory(args: argparse.Namespace, shape: LlamaShape) -> tuple[int, int, int, str]:
    """(KV budget for 1 worker, for 2 workers, clients, card name) from the free device memory."""
    if not args.device.startswith("cuda"):
        return 256 << 20, 256 << 20, args.clients, "cpu"
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(args.device))
    reserve = weight_bytes(shape) + args.worker_reserve_gib * GIB
    budget1 = int(free - reserve - 2 * GIB)
    budget2 = int(free - 2 * reserve - 2 * GIB)
    per_client = kv_bytes_per_token(shape, 2) * args.rounds * (args.new_tokens + args.output_tokens)
    clients = max(1, min(args.clients, int(0.9 * budget1 // per_client)))
    return budget1, budget2, clients, torch.cuda.get_device_name(torch.device(args.device))


def phase_b(stack: Stack, args: argparse.Namespace, clients: int, vocab: int, encode) -> dict:
    spec = MultiTurn(
        clients=clients,
        rounds=args.rounds,
        new_tokens=args.new_tokens,
        output_tokens=args.output_tokens,
        request_rate=args.request_rate,
        max_parallel=min(args.max_parallel, clients),
    )
    out = {"workload": {**{k: getattr(spec, k) for k in spec.__slots__}, "clients_requested": args.clients}}
    out["hit_rate_ceiling"] = round(spec.hit_rate_ceiling(16), 4)
    for name, cache in (("cache", True), ("no_cache", False)):
        start = time.perf_counter()
        out[name] = asyncio.run(run_multi_turn(stack.config.url, stack.model, spec, vocab, encode, cache))
        print(f"multi-turn {name}: {out[name]} ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def phase_c(stack: Stack, args: argparse.Namespace, vocab: int, salt: str) -> dict:
    """`--groups-repeats` rounds of the groups workload (fresh prefixes each: another salt); the round
    with the median followers' throughput, with every round's figure beside it."""
    rounds = []
    for i in range(args.groups_repeats):
        since = stack.log_sizes()
        out = asyncio.run(
            run_groups(
                stack.config.url, stack.model, args.groups, args.followers, args.group_prefix_tokens, 128,
                args.output_tokens // 2, vocab, f"{salt}-{i}",
            )
        )  # fmt: skip
        per_worker = stack.steps(since)
        out["prefill_tokens_per_worker"] = [sum(s[2] for s in w) for w in per_worker]
        out["steps_per_worker"] = [step_summary(w) for w in per_worker]
        rounds.append(out)
    out = sorted(rounds, key=lambda r: r["requests_per_s"])[len(rounds) // 2]
    out["requests_per_s_all"] = [r["requests_per_s"] for r in rounds]
    out["prefill_tokens_ideal"] = (
        args.groups * (args.group_prefix_tokens + 128) + args.groups * args.followers * 128
    )
    out["prefix_len"] = args.group_prefix_tokens
    return out


def step_summary(steps: list[tuple[int, int, int, int, float]]) -> dict:
    """One worker's logged steps: how many, their summed time, and the decode-only ones apart."""
    decode = [s for s in steps if s[2] == 0]
    return {
        "steps": len(steps),
        "step_ms_total": round(sum(s[4] for s in steps), 1),
        "decode_steps": len(decode),
        "decode_ms_mean": round(sum(s[4] for s in decode) / len(decode), 2) if decode else None,
        "decode_seqs_mean": round(sum(s[0] for s in decode) / len(decode), 1) if decode else None,
        "prefill_steps": len(steps) - len(decode),
        "prefill_ms_total": round(sum(s[4] for s in steps if s[2]), 1),
    }


def target(measured: float | None, goal: float, ceiling: float | None = None, higher: bool = True) -> dict:
    met = measured is not None and (measured >= goal if higher else measured <= goal)
    return {"measured": measured, "target": goal, "ceiling": ceiling, "met": met}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def build_report(
    args: argparse.Namespace,
    shape: LlamaShape,
    card: str,
    bw: float | None,
    a,
    b,
    c1,
    c2,
    c2_spread,
    previous,
) -> dict:
    """The JSON report. Sections of phases not run this time (None) come from `previous` (an earlier
    report), each marked with "from": that report's run label, as do their targets."""
    # Streaming reads run at about the copy figure (read + write bytes per second) on H100/H200.
    floor_ms = weight_bytes(shape, read_only=True) / bw * 1e3 if bw else None
    targets: dict = {}
    if a is not None:
        targets["ttft_cached_speedup"] = target(ratio(a["ttft_cold_s"], a["ttft_cached_s"]), 20.0)
        targets["ttft_cached_speedup_text"] = target(
            ratio(a["ttft_cold_text_s"], a["ttft_cached_text_s"]), 20.0
        )
        targets["forward_cached_speedup"] = target(
            ratio(a["forward_cold_ms"], a["forward_cached_ms"]), 40.0, ratio(a["forward_cold_ms"], floor_ms)
        )
    if b is not None:
        # Ceiling: if prefill were all the work, the cache saves at most this factor of prompt tokens.
        targets["multiturn_throughput_ratio"] = target(
            ratio(b["cache"]["total_tokens_per_s"], b["no_cache"]["total_tokens_per_s"]), 4.0,
            round(1 / (1 - b["hit_rate_ceiling"]), 2),
        )  # fmt: skip
        targets["multiturn_token_hit_rate"] = target(
            b["cache"]["token_hit_rate"], 0.75, b["hit_rate_ceiling"]
        )
    if c1 is not None and c2 is not None:
        targets["two_workers_throughput_ratio"] = target(
            ratio(c2["requests_per_s"], c1["requests_per_s"]), 1.0
        )
        targets["two_workers_every_follower_hit"] = target(
            float(c2["min_cached_tokens"] == c2["prefix_len"]), 1.0
        )
    if c1 is not None and c2_spread is not None:  # the baseline: requests spread over the two workers
        targets["two_workers_spread_ratio"] = target(
            ratio(c2_spread["requests_per_s"], c1["requests_per_s"]), 1.0
        )
    sections = {
        "shared_prefix": a,
        "multi_turn": b,
        "groups_1_worker": c1,
        "groups_2_workers": c2,
        "groups_2_workers_spread": c2_spread,
    }
    if previous is not None:
        label = previous.get("run") or f"{previous['card']}, {previous['date']}"
        for name, value in sections.items():
            if value is None and previous.get(name) is not None:
                sections[name] = {**previous[name], "from": previous[name].get("from", label)}
        for key, value in previous["targets"].items():
            if key not in targets:
                targets[key] = {**value, "from": value.get("from", label)}
    return {
        "run": args.run_label,
        "card": card,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.serve_bench " + " ".join(sys.argv[1:]),
        "shape": {k: getattr(shape, k) for k in shape.__slots__},
        "copy_bandwidth_GBps": round(bw / 1e9, 1) if bw else None,
        "weight_read_floor_ms": round(floor_ms, 3) if floor_ms else None,
        "targets": targets,
        **sections,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = report["shared_prefix"], report["multi_turn"]
    c1, c2 = report["groups_1_worker"], report["groups_2_workers"]
    c2_spread = report.get("groups_2_workers_spread")

    def src(section: dict) -> str:
        return f"\n({section['from']})" if "from" in section else ""

    bars = []
    if a is not None:
        bars += [
            (
                ["cold", "cached"],
                [a["ttft_cold_s"] * 1e3, a["ttft_cached_s"] * 1e3],
                "TTFT ms, token ids" + src(a),
            ),
            (
                ["cold", "cached"],
                [a["ttft_cold_text_s"] * 1e3, a["ttft_cached_text_s"] * 1e3],
                "TTFT ms, text" + src(a),
            ),
            (
                ["cold", "cached"],
                [a["forward_cold_ms"] or 0, a["forward_cached_ms"] or 0],
                "engine step ms" + src(a),
            ),
        ]
    if b is not None:
        bars.append(
            (
                ["no cache", "cache"],
                [b["no_cache"]["total_tokens_per_s"], b["cache"]["total_tokens_per_s"]],
                "multi-turn tokens/s" + src(b),
            )
        )
    if c1 is not None and c2 is not None:
        labels, values = ["1 worker", "2 workers"], [c1["requests_per_s"], c2["requests_per_s"]]
        if c2_spread is not None:
            labels, values = ["1", "2, packed", "2, spread"], [*values, c2_spread["requests_per_s"]]
        bars.append((labels, values, "shared groups req/s (workers)" + src(c2)))
    fig, axes = plt.subplots(1, len(bars), figsize=(4 * len(bars), 3.8), squeeze=False)
    for ax, (labels, values, title) in zip(axes[0], bars, strict=True):
        ax.bar(labels, values, color=["#999", "#2a7", "#c84"][: len(values)])
        ax.set_title(title, fontsize=9)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.3g}", ha="center", va="bottom")
    fig.suptitle(f"radixkv serve bench, {report['card']}, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--shape", choices=("8b", "tiny"), default="8b")
    p.add_argument("--out", type=Path, default=Path("bench/results/serve_bench.json"))
    p.add_argument("--prefix-tokens", type=int, default=10000)
    p.add_argument("--question-tokens", type=int, default=100)
    p.add_argument("--cold-reps", type=int, default=3)
    p.add_argument("--hot-reps", type=int, default=5)
    p.add_argument("--clients", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=64.0)
    p.add_argument("--max-parallel", type=int, default=256)
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--followers", type=int, default=8)
    p.add_argument("--group-prefix-tokens", type=int, default=2048)
    p.add_argument("--groups-repeats", type=int, default=3, help="rounds of phase C per stack (median kept)")
    p.add_argument("--dispatch", default="auto", help="the daemon's --dispatch for every stack")
    p.add_argument(
        "--spread-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="phase C also runs 2 workers with --dispatch spread (requests split between them)",
    )
    p.add_argument("--max-running", type=int, default=128)
    p.add_argument("--prefill-chunk", type=int, default=16384)
    p.add_argument("--worker-reserve-gib", type=int, default=8, help="per worker beyond the weights")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--mixed-steps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the workers' --mixed-steps",
    )
    p.add_argument("--phases", default="abc", help="which phases to run: a (shared prefix), b, c")
    p.add_argument("--previous", type=Path, help="an earlier report: sections of phases not run come from it")
    p.add_argument("--run-label", default=None, help="a name for this run, kept in the report")
    p.add_argument("--logs-out", type=Path, help="write every stack's logs (steps included) to this .tar.gz")
    args = p.parse_args(argv)
    if not set(args.phases) <= set("abc") or not args.phases:
        p.error("--phases takes letters from a, b, c")
    previous = json.loads(args.previous.read_text()) if args.previous else None
    shape = LLAMA3_8B if args.shape == "8b" else TINY
    bw = measure_copy_bandwidth(args.device)
    budget1, budget2, clients, card = plan_memory(args, shape)
    print(
        f"{card}: KV budget {budget1 / GIB:.1f} GiB (1 worker), {budget2 / GIB:.1f} GiB (2); {clients} clients"
    )
    with tempfile.TemporaryDirectory(prefix="radixkv-serve-") as tmpdir:
        tmp = Path(tmpdir)
        model_dir = write_model_dir(tmp / "model", shape)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

        def encode(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False).ids

        a = b = c1 = c2 = c2_spread = None
        try:
            with Stack(args, model_dir, 1, budget1, tmp) as stack:
                if "a" in args.phases:
                    a = phase_a(stack, args, shape.vocab_size)
                    print(f"shared prefix: {a}", flush=True)
                if "b" in args.phases:
                    b = phase_b(stack, args, clients, shape.vocab_size, encode)
                if "c" in args.phases:
                    c1 = phase_c(stack, args, shape.vocab_size, "groups1")
                    print(f"groups, 1 worker: {c1}", flush=True)
            if "c" in args.phases:
                with Stack(args, model_dir, 2, budget2, tmp) as stack:
                    c2 = phase_c(stack, args, shape.vocab_size, "groups2")
                    print(f"groups, 2 workers ({args.dispatch}): {c2}", flush=True)
                if args.spread_baseline:
                    with Stack(args, model_dir, 2, budget2, tmp, ("--dispatch", "spread")) as stack:
                        c2_spread = phase_c(stack, args, shape.vocab_size, "groups2s")
                        print(f"groups, 2 workers (spread): {c2_spread}", flush=True)
        finally:
            if args.logs_out is not None:  # every stack's daemon and worker logs, steps included
                import tarfile

                with tarfile.open(args.logs_out, "w:gz") as tar:
                    for log_dir in sorted(tmp.glob("logs-*")):
                        tar.add(log_dir, arcname=log_dir.name)
            for log in sorted(tmp.glob("logs-*/*.log")):
                lines = log.read_text(errors="replace").splitlines()
                keep = [line for line in lines if "step seqs=" not in line and " trace tokens=" not in line]
                print(f"---- {log.parent.name}/{log.name} ({len(lines)} lines, steps omitted)")
                print("\n".join(keep[-40:]))
    report = build_report(args, shape, card, bw, a, b, c1, c2, c2_spread, previous)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["targets"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
