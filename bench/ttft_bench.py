"""Time to first token with and without the shared prefix cached, through the whole stack.

    python -m bench.ttft_bench [--json] [--workers 2] [--cold-reps 3] [--hot-reps 5]

Starts the local stack (`cachemgr up`'s supervisor: daemon + N workers on the embedded SmolLM2), then
sends /v1/completions requests of a 2000-token shared system prompt plus a 50-token question:

    cold: |<------------- system prompt (2000) ------------->|<- question (50) ->|   all computed
    hot:  |<------------- system prompt (cached) ----------->|<- question (50) ->|   only this computed

Cold requests each use a fresh cache_salt (their own namespace, so nothing is cached); hot requests
share one salt whose system prompt was computed once beforehand, and each asks a different question.
TTFT is measured at the client: request sent -> first streamed chunk. Prefill tokens/s is the cold
prompt length over the cold TTFT; decode tokens/s is measured on one 64-token greedy output (EOS
ignored). With --json the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

from cachemgr.launcher import StackConfig, Supervisor, free_port
from shared.default_model import default_model_path
from shared.tokenizer import load_tokenizer

SYSTEM_TOKENS = 2000
QUESTION_TOKENS = 50
DECODE_TOKENS = 64
_SYSTEM_TEXT = (
    "You are the support assistant of a company that rents out bicycles in a large city. Customers ask "
    "about opening hours, prices, deposits, damage, lost keys, helmets, child seats, electric bikes, "
    "route suggestions and the rules of the road. Always be polite, precise and brief. "
)


def exact_tokens(tokenizer: object, text: str, count: int) -> list[int]:
    """`count` token ids of `text` repeated as often as needed (a realistic, deterministic prompt)."""
    ids: list[int] = []
    while len(ids) < count:
        ids += tokenizer.encode(text)  # type: ignore[attr-defined]
    return ids[:count]


def question(tokenizer: object, number: int) -> list[int]:
    text = f" Question {number}: how much does renting bike number {number * 7} cost for {number} days? "
    return exact_tokens(tokenizer, text, QUESTION_TOKENS)


def first_chunk_s(client: OpenAI, model: str, prompt: list[int], salt: str, max_tokens: int = 1) -> float:
    """Seconds from sending the request to the first streamed chunk (the first token)."""
    start = time.perf_counter()
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"cache_salt": salt},
    )
    ttft = None
    for _chunk in stream:
        if ttft is None:
            ttft = time.perf_counter() - start
    assert ttft is not None, "the stream ended without a chunk"
    return ttft


def decode_rate(client: OpenAI, model: str, prompt: list[int]) -> float:
    """Output tokens/s of one greedy request after its first token (prefill excluded)."""
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=DECODE_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "cache_salt": "decode"},
    )
    first = None
    tokens = 0
    for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    assert first is not None and tokens > 1, "the decode request produced too few tokens"
    return (tokens - 1) / (end - first)


def run(args: argparse.Namespace) -> dict[str, object]:
    model_path = Path(args.model) if args.model else default_model_path()
    tokenizer = load_tokenizer(model_path)
    system = exact_tokens(tokenizer, _SYSTEM_TEXT, SYSTEM_TOKENS)
    with tempfile.TemporaryDirectory(prefix="radixkv-ttft-") as tmp:
        config = StackConfig(
            num_workers=args.workers,
            model=str(model_path),
            http_port=free_port(),
            run_dir=Path(tmp) / "run",
            log_dir=Path(tmp) / "logs",
            worker_threads=args.worker_threads,
            ready_timeout_s=600.0,
        )
        with Supervisor(config) as stack:
            stack.wait_ready(min_workers=args.workers)
            client = OpenAI(base_url=config.url + "/v1", api_key="none", max_retries=0, timeout=600)
            model = client.models.list().data[0].id
            # One request per worker at once, so every worker's first-call costs are out of the way.
            with ThreadPoolExecutor(args.workers) as pool:
                warm = [
                    pool.submit(first_chunk_s, client, model, question(tokenizer, 900 + i), "warmup")
                    for i in range(args.workers)
                ]
                for future in warm:
                    future.result()
            cold = [
                first_chunk_s(client, model, system + question(tokenizer, i), f"cold-{i}")
                for i in range(args.cold_reps)
            ]
            first_chunk_s(
                client, model, system + question(tokenizer, 100), "hot"
            )  # computes the shared prefix
            hot = [
                first_chunk_s(client, model, system + question(tokenizer, 101 + i), "hot")
                for i in range(args.hot_reps)
            ]
            decode = decode_rate(client, model, question(tokenizer, 500))
    cold_s, hot_s = statistics.median(cold), statistics.median(hot)
    return {
        "cold_ttft_s": round(cold_s, 4),
        "hot_ttft_s": round(hot_s, 4),
        "speedup": round(cold_s / hot_s, 2),
        "prefill_tok_s": round((SYSTEM_TOKENS + QUESTION_TOKENS) / cold_s, 1),
        "decode_tok_s": round(decode, 2),
        "cold_ttft_all_s": [round(x, 4) for x in cold],
        "hot_ttft_all_s": [round(x, 4) for x in hot],
        "system_tokens": SYSTEM_TOKENS,
        "question_tokens": QUESTION_TOKENS,
        "workers": args.workers,
        "threads_per_worker": config.threads_per_worker(),
        "model": model,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="TTFT: cold vs cached shared prefix, through the whole stack.")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--worker-threads", type=int, default=0, help="torch threads per worker (0: cores / workers)"
    )
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    p.add_argument("--cold-reps", type=int, default=3)
    p.add_argument("--hot-reps", type=int, default=5)
    args = p.parse_args(argv)
    result = run(args)
    print(
        f"cold TTFT  {result['cold_ttft_s']:.3f} s   (median of {args.cold_reps}: {result['cold_ttft_all_s']})"
    )
    print(
        f"hot TTFT   {result['hot_ttft_s']:.3f} s   (median of {args.hot_reps}: {result['hot_ttft_all_s']})"
    )
    print(f"speedup    {result['speedup']}x")
    print(f"prefill    {result['prefill_tok_s']} tokens/s (cold)   decode {result['decode_tok_s']} tokens/s")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
