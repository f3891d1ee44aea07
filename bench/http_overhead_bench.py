"""The daemon's per-request CPU overhead on the time-to-first-token path, everything but the model.

    python -m bench.http_overhead_bench [--json] [--requests 50] [--warmup 10] [--profile out.prof]

Runs the real daemon (PrefixCache, shm pool, ROUTER socket) and its real HTTP app on uvloop in this
process, one worker process that answers every Dispatch at once (the scripted test worker, minus its
prefix-page verification, emitting the first token before the commit as the real engine does), and a
client in a third process (http.client, bodies encoded before the clock starts). Every request is a
10,000-token shared prefix (cached by the warm-up) plus a fresh 100-token question, max_tokens=1,
streamed:

    | shared prefix: 10,000 tokens (cached, 625 pages) | question: 100 tokens (new) |

Three cases: token-id prompts (/v1/completions), the same text as a text prompt, and chat (the prefix as
the system message, the question as the user message). Timings at the client: request sent -> response
headers, and -> the first SSE event carrying text (TTFT). Medians of --requests after --warmup.
With --profile, the daemon's event-loop thread runs under cProfile during the measured requests (the
numbers are then inflated; the tokenizer's executor threads are timed separately, "encode_ms").
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime
import http.client
import json
import os
import platform
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PAGE = 16
MODEL = "bench-model"
_WORDS = [
    "policy",
    "customer",
    "refund",
    "shipping",
    "order",
    "account",
    "password",
    "invoice",
    "delivery",
    "return",
    "warranty",
    "product",
    "support",
    "agent",
    "answer",
    "politely",
    "briefly",
    "always",
    "never",
    "escalate",
    "manager",
    "discount",
    "price",
    "tax",
    "region",
    "language",
    "English",
    "French",
    "German",
    "hours",
    "weekend",
    "holiday",
    "damage",
    "lost",
    "replacement",
    "tracking",
    "number",
]


# --------------------------------------------------------------------------- prompts


def make_prompts(tokenizer: Any, prefix_tokens: int, new_tokens: int, count: int) -> dict[str, Any]:
    """A deterministic prefix text of exactly `prefix_tokens` tokens (BOS included) and `count`
    distinct question texts of about `new_tokens` tokens each."""
    rng = random.Random(7)
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words))) < prefix_tokens + 50:
        words += [rng.choice(_WORDS) for _ in range(500)]
    lo, hi = 0, len(words)  # the longest word prefix of at most prefix_tokens tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(tokenizer.encode(" ".join(words[:mid]))) <= prefix_tokens else (lo, mid - 1)
    prefix = " ".join(words[:lo])
    prefix_ids = tokenizer.encode(prefix)[:prefix_tokens]
    questions = [
        " Question " + str(i) + ": " + " ".join(rng.choice(_WORDS) for _ in range(new_tokens - 4))
        for i in range(count)
    ]
    question_ids = [(tokenizer.encode(q)[1:] + [42] * new_tokens)[:new_tokens] for q in questions]
    return {"prefix": prefix, "prefix_ids": prefix_ids, "questions": questions, "question_ids": question_ids}


def request_bodies(prompts: dict[str, Any], case: str) -> list[tuple[str, bytes]]:
    """(path, JSON body) of every request of one case, in the order they are sent."""
    common = {"max_tokens": 1, "stream": True, "stream_options": {"include_usage": True}, "cache_salt": case}
    out = []
    for question, ids in zip(prompts["questions"], prompts["question_ids"], strict=True):
        if case == "ids":
            path, body = "/v1/completions", {"prompt": prompts["prefix_ids"] + ids}
        elif case == "text":
            path, body = "/v1/completions", {"prompt": prompts["prefix"] + question}
        else:
            messages = [
                {"role": "system", "content": prompts["prefix"]},
                {"role": "user", "content": question},
            ]
            path, body = "/v1/chat/completions", {"messages": messages}
        out.append((path, json.dumps({**body, **common}).encode()))
    return out


# --------------------------------------------------------------------------- client (its own process)


def run_client(port: int, bodies_file: Path) -> list[dict[str, float]]:
    """Send each request in turn on one keep-alive connection; time headers and the first text event."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    results = []
    for line in bodies_file.read_text().splitlines():
        path, body = json.loads(line)
        data = body.encode()
        t0 = time.perf_counter()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        t_headers = time.perf_counter()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        t_first, cached = 0.0, -1
        while (raw := resp.readline()) and raw.strip() != b"data: [DONE]":
            if not raw.startswith(b"data: "):
                continue
            event = json.loads(raw[6:])
            if event.get("usage"):
                cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
            choice = event["choices"][0] if event.get("choices") else {}
            if not t_first and (choice.get("text") or (choice.get("delta") or {}).get("content")):
                t_first = time.perf_counter()
        resp.read()
        results.append(
            {"headers_ms": (t_headers - t0) * 1e3, "ttft_ms": (t_first - t0) * 1e3, "cached": cached}
        )
    conn.close()
    return results


# --------------------------------------------------------------------------- worker (its own process)


def run_worker(endpoint: str) -> None:
    """The scripted worker answering at once: first token and Finished (with the prompt's full pages)
    right after the Dispatch, no prefix verification (a test's check, not a worker's work)."""
    from shared.ids import bytes_to_ids
    from tests.helpers.scripted_worker import ScriptedWorker, _Req

    class InstantWorker(ScriptedWorker):
        def on_dispatch(self, msg: Any) -> None:
            pages = bytes_to_ids(msg.prefix_page_ids).tolist() + bytes_to_ids(msg.new_page_ids).tolist()
            tokens = bytes_to_ids(msg.tokens).tolist()
            req = _Req(msg.request_id, tokens, len(tokens), msg.sampling.max_tokens, set(), pages, 0.0)
            req.committed = True  # the pages go back in Finished; no separate commit round trip
            self.requests[msg.request_id] = req
            self.step(req, time.monotonic())

    args = argparse.Namespace(
        daemon=endpoint, name="instant", model=MODEL, max_running=4, log="", crash_after=0, token_delay=0.0
    )
    InstantWorker(args).run()


# --------------------------------------------------------------------------- daemon + HTTP (this process)


async def serve_and_measure(
    args: argparse.Namespace, tokenizer: Any, prompts: dict[str, Any]
) -> dict[str, Any]:
    from aiohttp import web

    from cachemgr.cache import PrefixCache
    from cachemgr.daemon import Daemon, DaemonSettings
    from cachemgr.http import build_http_app
    from shared.kv_layout import KVLayout
    from shared.pool import create_pool

    tmp = Path(tempfile.mkdtemp(prefix="http-overhead-"))
    layout = KVLayout(num_layers=1, num_pages=8192, page_size=PAGE, num_kv_heads=1, head_dim=2)
    pool = create_pool(layout, "shm", name=f"http-overhead-{os.getpid()}")
    daemon = Daemon(
        cache=PrefixCache(layout.num_pages, page_size=PAGE),
        pool=pool.descriptor(),
        settings=DaemonSettings(endpoint=f"ipc://{tmp}/workers.sock"),
        model_name=MODEL,
        max_context_len=32768,
        vocab_size=tokenizer.vocab_size,
        tokenizer=tokenizer,
    )
    await daemon.start()
    app = build_http_app(
        daemon, tokenizer, model_name=MODEL, vocab_size=tokenizer.vocab_size, **args.app_kwargs
    )
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    me = [sys.executable, "-m", "bench.http_overhead_bench"]
    worker = subprocess.Popen([*me, "--worker", daemon.endpoint])
    report: dict[str, Any] = {}
    try:
        while not daemon.workers_info():
            await asyncio.sleep(0.02)
        for case in args.cases:
            bodies = request_bodies(prompts, case)
            warm, measured = tmp / f"{case}-warm.jsonl", tmp / f"{case}-measured.jsonl"
            warm.write_text("\n".join(json.dumps([p, b.decode()]) for p, b in bodies[: args.warmup]))
            measured.write_text("\n".join(json.dumps([p, b.decode()]) for p, b in bodies[args.warmup :]))
            await _client(me, port, warm)
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            results = await _client(me, port, measured)
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(f"{args.profile}.{case}")
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
            report[case] = _summary(results)
    finally:
        worker.terminate()
        worker.wait(10)
        await runner.cleanup()
        await daemon.stop()
        pool.close()
    return report


async def _client(me: list[str], port: int, bodies: Path) -> list[dict[str, float]]:
    proc = await asyncio.create_subprocess_exec(
        *me, "--client-port", str(port), "--client-bodies", str(bodies), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"client failed with exit code {proc.returncode}")
    return json.loads(out)


def _summary(results: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "n": len(results),
        "ttft_ms_median": round(statistics.median(r["ttft_ms"] for r in results), 3),
        "headers_ms_median": round(statistics.median(r["headers_ms"] for r in results), 3),
        "ttft_ms_p90": round(sorted(r["ttft_ms"] for r in results)[int(0.9 * (len(results) - 1))], 3),
        "cached_tokens": sorted({int(r["cached"]) for r in results}),
    }


def encode_ms(tokenizer: Any, prompts: dict[str, Any]) -> dict[str, float]:
    """Direct tokenizer time for one text and one chat prompt (median of 5), outside the daemon."""
    text = prompts["prefix"] + prompts["questions"][0]
    messages = [
        {"role": "system", "content": prompts["prefix"]},
        {"role": "user", "content": prompts["questions"][0]},
    ]

    def best(fn: Any) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return round(statistics.median(times), 3)

    return {
        "text": best(lambda: tokenizer.encode(text)),
        "chat": best(lambda: tokenizer.encode_chat(messages)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--requests", type=int, default=50, help="measured requests per case")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured requests per case first")
    parser.add_argument("--cases", default="ids,text,chat", help="comma-separated: ids, text, chat")
    parser.add_argument("--prefix-tokens", type=int, default=10_000)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--profile", default="", help="cProfile the daemon's loop; writes PATH.<case>")
    parser.add_argument("--no-tokenize-cache", action="store_true", help="tokenize whole texts every time")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--client-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--client-bodies", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker)
        return
    if args.client_port:
        print(json.dumps(run_client(args.client_port, Path(args.client_bodies))))
        return
    import uvloop

    from shared.default_model import default_model_path
    from shared.tokenizer import load_tokenizer

    args.cases = [c for c in args.cases.split(",") if c]
    args.app_kwargs = {"tokenize_cache_bytes": 0} if args.no_tokenize_cache else {}
    tokenizer = load_tokenizer(default_model_path())
    prompts = make_prompts(tokenizer, args.prefix_tokens, args.new_tokens, args.warmup + args.requests)
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.http_overhead_bench " + " ".join(sys.argv[1:]),
        "prefix_tokens": args.prefix_tokens,
        "new_tokens": args.new_tokens,
        "encode_ms": encode_ms(tokenizer, prompts),
        "cases": uvloop.run(serve_and_measure(args, tokenizer, prompts)),
    }
    for case, s in report["cases"].items():
        print(
            f"{case:5s} TTFT median {s['ttft_ms_median']:7.2f} ms (p90 {s['ttft_ms_p90']:7.2f}), headers "
            f"{s['headers_ms_median']:7.2f} ms, cached {s['cached_tokens']}, n={s['n']}"
        )
    print(
        f"tokenizer alone (one 10.1k prompt): text {report['encode_ms']['text']} ms, chat {report['encode_ms']['chat']} ms"
    )
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
