"""The full stack (daemon + workers, real HTTP) on a random-weight model, against issue 7's targets.

    python -m bench.serve_bench --device cuda:0 --out bench/results/serve_bench.json     # Llama-3-8B shape
    python -m bench.serve_bench --device cpu --shape tiny --clients 4 --rounds 2 ...      # a CPU smoke run

Phases (bench/serve_client.py has the workloads):
  A  shared prefix, 1 worker: TTFT cold vs cached through HTTP, and the engine's own step time for the
     same requests (worker `--log-steps` lines: the cold step has prefix+question tokens and nothing
     cached, the hot one only the question over the cached prefix)
  B  multi-turn, 1 worker: with the cache, then without (a fresh cache_salt per request)
  C  shared groups: the same requests on 1 worker, then on 2 workers sharing the pool (packed, then
     spread: --dispatch), three rounds each
bench/serve_stack.py runs the stacks and reads their step logs; bench/serve_report.py writes the report.
Writes JSON (every target: measured, target, ceiling, met) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.random_model import LLAMA3_8B, LlamaShape, write_model_dir
from bench.serve_client import MultiTurn, complete, random_tokens, run_groups, run_multi_turn
from bench.serve_report import build_report, plot
from bench.serve_stack import (
    GIB,
    TRACE_FIELDS,
    Stack,
    measure_copy_bandwidth,
    plan_memory,
    step_summary,
)

TINY = LlamaShape(1000, 256, 512, 2, 4, 2, 64, 32768, 10000.0, 1e-5)


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
            # The prefix cached under "hot", then two unmeasured hits: the first replays of the cached
            # step's graph ran 1.2-2x slower on an H100 (run 38), which is start-up, not steady state.
            for _ in range(3):
                await complete(
                    s, url, model, prefix + random_tokens(rng, args.question_tokens, vocab), 1, "hot"
                )
            since = stack.log_sizes()
            cold = [
                await complete(
                    s, url, model, prefix + random_tokens(rng, args.question_tokens, vocab), 1, f"cold{i}"
                )
                for i in range(args.cold_reps)
            ]
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
    cold_ms = cold_forward_ms(steps, total)
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
            f: round(statistics.median(t[f] for t in hot_traces), 3) for f in TRACE_FIELDS
        }
        if hot_traces
        else None,
        "forward_cold_all_ms": cold_ms,
        "forward_cached_all_ms": hot_ms,
    }


def cold_forward_ms(steps: list[tuple[int, int, int, int, float]], total: int) -> list[float]:
    """The engine's time for each cold `total`-token prompt in `steps`: its prefill chunks summed (a
    prompt longer than --prefill-chunk runs as several steps of one sequence, each over the ones before;
    only the last waits for the GPU, so the sum is the forward's wall time)."""
    out: list[float] = []
    done, acc = None, 0.0
    for seqs, tok, _, cached, ms in steps:
        if seqs == 1 and cached == 0:
            done, acc = tok, ms
        elif seqs == 1 and done is not None and cached == done:
            done, acc = done + tok, acc + ms
        else:
            done = None
            continue
        if done == total:
            out.append(round(acc, 3))
            done = None
    return out


def phase_b(stack: Stack, args: argparse.Namespace, clients: int, vocab: int, encode) -> dict:
    spec = MultiTurn(
        clients=clients,
        rounds=args.rounds,
        new_tokens=args.new_tokens,
        output_tokens=args.output_tokens,
        request_rate=args.request_rate,
        max_parallel=min(args.max_parallel, clients),
        temperature=args.temperature,
        top_p=args.top_p,
        extra_body=tuple(json.loads(args.sampling_json).items()),
    )
    out = {"workload": {**{k: getattr(spec, k) for k in spec.__slots__}, "clients_requested": args.clients}}
    out["hit_rate_ceiling"] = round(spec.hit_rate_ceiling(16), 4)
    for name, cache in (("cache", True), ("no_cache", False)):
        if name not in args.multi_turn_runs.split(","):
            continue
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
    p.add_argument(
        "--multi-turn-runs", default="cache,no_cache", help="which multi-turn runs: cache, no_cache or both"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="multi-turn sampling (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="multi-turn sampling")
    p.add_argument(
        "--sampling-json",
        default="{}",
        help='more multi-turn sampling fields, e.g. \'{"frequency_penalty": 0.5, "repetition_penalty": 1.1}\'',
    )
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
    p.add_argument("--max-running", type=int, default=0, help="the workers' flag; 0: by device (256 on CUDA)")
    p.add_argument(
        "--prefill-chunk", type=int, default=0, help="the workers' flag; 0: by device (8192 on CUDA)"
    )
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
