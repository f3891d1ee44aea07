"""Where the host time of the cached step goes: the model bench's graphed step against the same step
through the worker's Engine, in one process, on one card.

The serve bench's worker trace puts the cached 100-over-10,000 step at ~1.6 ms of host time (batch build
+ forward issue) while the model bench's graphed step spends ~0.5 ms. This runs the step three ways on a
random-weight Llama-3-8B-shape model with the worker's own CUDA configuration (CudaModelRunner with the
serving defaults, a FlashInfer backend, CUDA-event fences):

    bench    build_forward_batch + CudaModelRunner.forward, as bench/gpu_model_bench.py times it
    engine   Engine.add(Dispatch) + Engine.step() on this thread (the request aborted after each step)
    thread   the same step submitted to a one-thread executor from an asyncio loop, as the runtime does
    engine_after_cold   the engine's step right after a cold 10,100-token forward each time (phase A's order)

and reports, per way, the median host ms of each phase and the step's wall time, plus a cProfile of the
engine steps (top functions by own time).

    PYTHONPATH=. python3 bench/step_host_bench.py --out $OUT/step_host.json
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import cProfile
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.gpu_model_bench import PAGE, bound_runner
from bench.gpu_timing import run_metadata
from computeworker.engine.engine import Engine, EngineConfig
from computeworker.engine.fences import StepStats, cuda_fence_factory
from computeworker.model.attention_flashinfer import FlashInferAttention
from computeworker.model.cuda_runner import CudaModelRunner
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from shared.ids import ids_to_bytes
from shared.protocol import Dispatch, SamplingParams

PREFIX, NEW = 10_000, 100


class _NoDetokenizer:
    """The engine asks for a detokenizer only for stop strings; this bench sends none."""

    def detokenizer(self, prompt: list[int]) -> Any:
        raise AssertionError("no stop strings in this bench")


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 3)


def bench_way(runner: CudaModelRunner, pool: torch.Tensor, attention: FlashInferAttention, reps: int) -> dict:
    """build_forward_batch + forward + sync, host phases timed with perf_counter."""
    ids = list(range(1000, 1000 + NEW))
    pages = list(range(-(-(PREFIX + NEW) // PAGE)))
    build, issue, wall = [], [], []
    for i in range(reps + 3):
        t0 = time.perf_counter()
        batch = build_forward_batch([SeqChunk(ids, PREFIX, pages)], PAGE, "cuda")
        t1 = time.perf_counter()
        runner.forward(batch, pool, attention)
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        if i >= 3:
            build.append(t1 - t0)
            issue.append(t2 - t1)
            wall.append(t3 - t0)
    return {"build_ms": _median_ms(build), "issue_ms": _median_ms(issue), "wall_ms": _median_ms(wall)}


class EngineWay:
    """One Dispatch of the cached step at a time through a real Engine."""

    def __init__(self, runner: CudaModelRunner, pool: torch.Tensor, attention: FlashInferAttention, ctx: int):
        self.stats: list[StepStats] = []
        config = EngineConfig(
            page_size=PAGE, context_len=ctx, max_running=256, prefill_chunk=8192, mixed_steps=False
        )
        self.engine = Engine(
            runner,
            attention,
            pool,
            _NoDetokenizer(),  # type: ignore[arg-type]
            config,
            make_fence=cuda_fence_factory(pool.device),
            on_step=self.stats.append,
        )
        self.prompt = list(range(1000, 1000 + PREFIX + NEW))
        self.prefix_pages = list(range(PREFIX // PAGE))
        total_pages = -(-(PREFIX + NEW + 1) // PAGE)
        self.new_pages = list(range(PREFIX // PAGE, total_pages + 1))
        self.count = 0

    def dispatch(self) -> bytes:
        self.count += 1
        rid = self.count.to_bytes(16, "big")
        self.engine.add(
            Dispatch(
                rid,
                ids_to_bytes(self.prompt),
                PREFIX,
                ids_to_bytes(self.prefix_pages),
                ids_to_bytes(self.new_pages),
                SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
            )
        )
        return rid

    def finish(self, rid: bytes) -> None:
        torch.cuda.synchronize()
        self.engine.take_messages()
        self.engine.abort(rid)

    def summary(self, walls: list[float]) -> dict:
        st = self.stats[-len(walls) :]
        return {
            "build_ms": _median_ms([s.build_s for s in st]),
            "issue_ms": _median_ms([s.forward_s for s in st]),
            "sample_ms": _median_ms([s.sample_s for s in st]),
            "step_ms": _median_ms([s.seconds for s in st]),
            "wall_ms": _median_ms(walls),
        }


def engine_way(way: EngineWay, reps: int, profile: bool) -> tuple[dict, str]:
    walls: list[float] = []
    profiler = cProfile.Profile() if profile else None
    for i in range(reps + 3):
        rid = way.dispatch()
        if profiler is not None and i >= 3:
            profiler.enable()
        t0 = time.perf_counter()
        way.engine.step()
        t1 = time.perf_counter()
        if profiler is not None and i >= 3:
            profiler.disable()
        way.finish(rid)
        if i >= 3:
            walls.append(t1 - t0)
    text = ""
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        text = out.getvalue()
    return way.summary(walls), text


def after_cold_way(
    way: EngineWay, runner: CudaModelRunner, pool: torch.Tensor, attention: FlashInferAttention, reps: int
) -> dict:
    """The engine's cached step right after a cold 10,100-token forward, as the serve bench's phase A
    alternates them: does the GPU run the cached step slower after a long full-power prefill?"""
    ids = list(range(1000, 1000 + PREFIX + NEW))
    pages = list(range(-(-(PREFIX + NEW) // PAGE)))
    walls: list[float] = []
    for i in range(reps // 3 + 2):
        for start in range(0, PREFIX + NEW, 8192):  # the CUDA worker's default 8192-token chunks
            chunk = ids[start : start + 8192]
            runner.forward(
                build_forward_batch([SeqChunk(chunk, start, pages)], PAGE, "cuda"), pool, attention
            )
        torch.cuda.synchronize()
        rid = way.dispatch()
        t0 = time.perf_counter()
        way.engine.step()
        t1 = time.perf_counter()
        way.finish(rid)
        if i >= 2:
            walls.append(t1 - t0)
    return way.summary(walls)


def thread_way(way: EngineWay, reps: int) -> dict:
    """Each step on a compute thread, awaited from an asyncio loop that also runs a heartbeat task."""
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compute")
    walls: list[float] = []

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(0.5)

    async def drive() -> None:
        beat = asyncio.ensure_future(heartbeat())
        for i in range(reps + 3):
            rid = way.dispatch()
            t0 = time.perf_counter()
            await asyncio.wrap_future(executor.submit(way.engine.step))
            t1 = time.perf_counter()
            way.finish(rid)
            if i >= 3:
                walls.append(t1 - t0)
        beat.cancel()

    asyncio.run(drive())
    executor.shutdown()
    return way.summary(walls)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_host.json"))
    parser.add_argument(
        "--max-graph-batch", type=int, default=256, help="decode graphs as a CUDA worker captures"
    )
    args = parser.parse_args(argv)

    bound = bound_runner(-(-(PREFIX + NEW) // PAGE) + 64, args.max_graph_batch)
    spec, runner, pool, attention = bound.spec, bound.runner, bound.pool, bound.attention
    results: dict[str, Any] = {"meta": run_metadata(), "bind_s": round(bound.bind_s, 1), "reps": args.reps}
    way = EngineWay(runner, pool, attention, spec.max_position_embeddings)
    runs: list[tuple[str, Callable[[], dict]]] = [
        ("bench", lambda: bench_way(runner, pool, attention, args.reps)),
        ("engine", lambda: engine_way(way, args.reps, profile=False)[0]),
        ("thread", lambda: thread_way(way, args.reps)),
        ("engine_after_cold", lambda: after_cold_way(way, runner, pool, attention, args.reps)),
        ("engine_again", lambda: engine_way(way, args.reps, profile=False)[0]),
        ("bench_again", lambda: bench_way(runner, pool, attention, args.reps)),
    ]
    for name, run in runs:
        results[name] = run()
        print(name, results[name], flush=True)
    _, profile_text = engine_way(way, args.reps, profile=True)
    results["engine_profile"] = profile_text
    print(profile_text)
    results["graph_steps"] = {"extend": runner.num_extend_graph_steps, "eager": runner.num_eager_steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
