"""Where the cached step's GPU time goes: 100 new tokens over a cached 10,000-token prefix on a random
Llama-3-8B-shape model, replayed from CudaModelRunner's extend graph, profiled per kernel.

    PYTHONPATH=. python3 bench/gpu_profile.py --out $OUT/gpu_profile.json

For each extend-graph backend (default fa2, fa3; `--backends auto,fa2` for the worker's default): the step's median time (batch building and plan() included,
as the worker runs it), then torch.profiler (CUPTI) over graph replays, each kernel put in a class
(GEMM, attention, split-KV merge, norms, RoPE, activation, K/V writes and gathers, memsets, other), with
the GPU-busy time, the gaps between kernels and the host time outside the GPU's work. Also every GEMM
kind alone at M=128 over all 32 layers' weights against the copy bandwidth (the weight-read floor).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from bench.gpu_model_bench import LLAMA3_8B_CONFIG, PAGE, Runner, cached_step_runner, random_model
from bench.gpu_timing import copy_tbps, run_metadata, time_ms
from computeworker.model import forward_batch
from computeworker.model.cuda_runner import CudaModelRunner
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.llama import LlamaModel
from shared.model_spec import spec_from_hf_config

PREFIX, QUESTION = 10_000, 100
# (class, substrings of the kernel name), first match wins: FlashInfer's own kernels before the GEMM
# patterns (fa3 is built on CUTLASS).
CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("norm", ("RMSNorm", "Norm", "rmsnorm_kernel")),
    ("triton_gemm", ("gate_up_silu", "linear_partials")),
    ("rope", ("Rotary", "Rope", "rope")),
    ("activation", ("act_and_mul", "silu", "Silu")),
    ("attention_merge", ("MergeStates", "AttentionSum", "merge_kernel")),
    ("attention", ("Prefill", "Attention", "Attn", "fmha", "Decode")),
    ("gemm", ("gemm", "Gemm", "GEMM", "nvjet", "xmma", "cutlass", "splitK", "cublas")),
    ("kv_write_gather", ("index", "Index", "scatter", "gather", "embedding")),
    ("memset", ("fill", "Fill", "zero", "Memset", "memset")),
    ("copy", ("copy", "Copy", "Memcpy")),
    ("elementwise", ("elementwise", "Elementwise", "vectorized", "reduce")),
)


def kernel_class(name: str) -> str:
    return next((cls for cls, keys in CLASSES if any(k in name for k in keys)), "other")


def kernel_table(prof: profile, since_us: float, num_steps: int) -> dict[str, Any]:
    """Kernels that started after `since_us` (profiler clock), per class and per name, in us per step;
    plus the union of their intervals (GPU busy) and the span from the first start to the last end."""
    kernels = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and e.time_range.start >= since_us
    ]
    if not kernels:
        return {"num_kernels": 0}
    by_class: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, start, end in kernels:
        by_class[kernel_class(name)] += end - start
        by_name[name][0] += end - start
        by_name[name][1] += 1
    busy, last_end, last_class = 0.0, float("-inf"), ""
    # Idle GPU time before each kernel, by (class of the kernel that ran last, class of this one).
    gaps: dict[str, float] = defaultdict(float)
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        busy += max(0.0, end - max(start, last_end))
        if last_end > float("-inf") and start > last_end:
            gaps[f"{last_class} > {kernel_class(name)}"] += start - last_end
        if end >= last_end:
            last_end, last_class = end, kernel_class(name)
    span = max(k[2] for k in kernels) - min(k[1] for k in kernels)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "num_kernels_per_step": len(kernels) / num_steps,
        "busy_us_per_step": busy / num_steps,
        "span_us_per_step": span / num_steps,
        "idle_us_per_step_by_transition": {
            t: round(g / num_steps, 1) for t, g in sorted(gaps.items(), key=lambda x: -x[1])[:16]
        },
        "class_us_per_step": {
            c: round(t / num_steps, 1) for c, t in sorted(by_class.items(), key=lambda x: -x[1])
        },
        "top_kernels": [
            {
                "name": n[:160],
                "class": kernel_class(n),
                "us_per_step": round(t / num_steps, 1),
                "calls": c / num_steps,
            }
            for n, (t, c) in top
        ],
    }


def graph_step_figures(
    model: LlamaModel, runner: Runner, tokens: torch.Tensor, backend: str
) -> dict[str, Any]:
    """Time and profile the cached step through an extend graph on `backend`, and check its logits
    against the eager fused forward."""
    # int32 arrays, as the engine holds a request's tokens and page table
    ids = tokens[PREFIX:].numpy().astype(np.int32)
    pages = np.arange((PREFIX + QUESTION + PAGE - 1) // PAGE, dtype=np.int32)

    def batch() -> Any:
        return build_forward_batch([SeqChunk(ids, PREFIX, pages)], PAGE, "cuda")

    def make_runner() -> CudaModelRunner:
        cuda = cached_step_runner(model, backend)
        cuda.bind(runner.pool, runner.attn)
        for _ in range(3):
            cuda.forward(batch(), runner.pool, runner.attn)
        torch.cuda.synchronize()
        return cuda

    num_steps = 10
    capture_note = "captured inside the profiler"
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            # Captured inside the profiler, so CUPTI has seen the graph's kernels when it replays.
            cuda = make_runner()
            with record_function("replays"):  # an empty range: only its start time marks where replays begin
                pass
            for _ in range(num_steps):
                cuda.forward(batch(), runner.pool, runner.attn)
            torch.cuda.synchronize()
        marks = [e.time_range.start for e in prof.events() if e.name == "replays"]
        table = kernel_table(prof, marks[0] if marks else 0.0, num_steps)
    except Exception as exc:  # capture under the profiler failed: profile replays of a graph made outside it
        capture_note = f"capture under the profiler failed ({exc!r}); captured outside"
        cuda = make_runner()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(num_steps):
                cuda.forward(batch(), runner.pool, runner.attn)
            torch.cuda.synchronize()
        table = kernel_table(prof, 0.0, num_steps)
    table["note"] = capture_note
    graphed = cuda.forward(batch(), runner.pool, runner.attn).float().clone()
    eager = runner.forward(tokens[PREFIX:], PREFIX).float()
    step_ms = time_ms(lambda: cuda.forward(batch(), runner.pool, runner.attn), warmup=2, reps=30)
    replay_ms = time_ms(lambda: cuda._extend.run(batch()), warmup=2, reps=30, inner=5)  # type: ignore[union-attr]
    return {
        "step_ms": step_ms,
        "replay_back_to_back_ms": replay_ms,
        "host_phases_us": host_phases_us(cuda, batch),
        "graph_steps": cuda.num_extend_graph_steps,
        "eager_steps": cuda.num_eager_steps,
        "plan_mismatches": cuda._extend.num_plan_mismatches if cuda._extend else None,  # type: ignore[union-attr]
        "rel_err_vs_eager_fa3": float((graphed - eager).norm() / eager.norm()),
        "same_argmax_as_eager": bool(graphed.argmax(-1).eq(eager.argmax(-1)).all()),
        "profile": table,
    }


@torch.inference_mode()
def host_phases_us(cuda: CudaModelRunner, make_batch: Callable[[], Any], reps: int = 50) -> dict[str, float]:
    """Median host microseconds of each phase of a graphed step, the GPU idle before each step (as in
    serving, where the step waits for its token): the batch build (its device copy deferred, and made at
    once with a pageable copy for comparison), the attention plan with the launch-record check, the input
    staging, the graph launch; plus one small kernel launch and a stream sync for scale."""
    extend = cuda._extend
    assert extend is not None
    phases: dict[str, list[float]] = defaultdict(list)

    def pageable(array: Any, device: Any) -> torch.Tensor:
        return torch.from_numpy(array).to(device=device)

    scratch = torch.zeros(1, device="cuda")
    for _ in range(reps):
        torch.cuda.synchronize()
        marks = [time.perf_counter()]
        batch = make_batch()
        marks.append(time.perf_counter())
        slot = extend.prepare(batch)  # the attention plan and the launch-record check
        assert slot is not None
        marks.append(time.perf_counter())
        extend._stage_inputs(slot, batch)
        marks.append(time.perf_counter())
        slot.graph.replay()  # type: ignore[union-attr]
        marks.append(time.perf_counter())
        names = ["build", "plan", "stage_inputs", "graph_launch"]
        for name, a, b in zip(names, marks[:-1], marks[1:], strict=True):
            phases[name].append((b - a) * 1e6)
        phases["total"].append((marks[-1] - marks[0]) * 1e6)
        torch.cuda.synchronize()
        start = time.perf_counter()
        scratch.add_(1)
        phases["one_small_kernel"].append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        torch.cuda.synchronize()
        phases["idle_sync"].append((time.perf_counter() - start) * 1e6)
        original = forward_batch.host_to_device
        forward_batch.host_to_device = pageable  # type: ignore[assignment]
        try:
            start = time.perf_counter()
            _ = make_batch().device_fields
            phases["build_pageable"].append((time.perf_counter() - start) * 1e6)
        finally:
            forward_batch.host_to_device = original
    return {name: round(statistics.median(v), 1) for name, v in phases.items()}


def eager_profile(runner: Runner, tokens: torch.Tensor) -> dict[str, Any]:
    """The same step through the eager fused forward (fa3 attention): per-kernel device time, for
    comparison with the graph's (kernels are the same apart from attention; gaps are host launches)."""
    for _ in range(2):
        runner.forward(tokens[PREFIX:], PREFIX)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            runner.forward(tokens[PREFIX:], PREFIX)
        torch.cuda.synchronize()
    return kernel_table(prof, 0.0, 5)


def gemm_figures(model: LlamaModel, copy_gbps: float) -> dict[str, Any]:
    """Each GEMM kind at M=128 and M=100 over all layers' weights (so no weight sits in L2): ms per
    forward and the weight bytes read per second, against the copy bandwidth."""
    spec = model.spec
    out: dict[str, Any] = {}
    kinds = {
        "qkv": [layer.qkv_weight for layer in model.layers],
        "o": [layer.o_weight for layer in model.layers],
        "gate_up": [layer.gate_up_weight for layer in model.layers],
        "down": [layer.down_weight for layer in model.layers],
        "lm_head_1row": [model.lm_head],
    }
    for m in (128, 100):
        for kind, weights in kinds.items():
            rows = 1 if kind == "lm_head_1row" else m
            x = torch.randn(rows, weights[0].shape[1], dtype=torch.bfloat16, device="cuda")

            def run(ws: list[torch.Tensor] = weights, x: torch.Tensor = x) -> None:
                for w in ws:
                    torch.nn.functional.linear(x, w)

            ms = time_ms(run, warmup=2, reps=10)
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            out[f"{kind}_m{rows}"] = {
                "ms": round(ms, 4),
                "GBps": round(nbytes / (ms * 1e-3) / 1e9, 1),
                "fraction_of_copy": round(nbytes / (ms * 1e-3) / 1e9 / copy_gbps, 3),
            }
        # The same GEMMs on the transposed layout (x @ W.T with W.T contiguous): cuBLAS picks kernels per
        # layout, and at small M one layout can read the weights faster than the other.
        for kind in ("qkv", "gate_up", "down") if m == 128 else ():
            weights_t = [w.t().contiguous() for w in kinds[kind]]
            x = torch.randn(m, weights_t[0].shape[0], dtype=torch.bfloat16, device="cuda")

            def run_t(ws: list[torch.Tensor] = weights_t, x: torch.Tensor = x) -> None:
                for w in ws:
                    torch.mm(x, w)

            ms = time_ms(run_t, warmup=2, reps=10)
            nbytes = sum(w.numel() * w.element_size() for w in weights_t)
            out[f"{kind}_m{m}_transposed"] = {
                "ms": round(ms, 4),
                "GBps": round(nbytes / (ms * 1e-3) / 1e9, 1),
            }
            del weights_t
    out["hidden"] = spec.hidden_size
    return out


def kv_write_figures(runner: Runner, num_rows: int = 128) -> dict[str, float]:
    """Writing num_rows tokens' K/V into every layer of the pool: four index_copy_ (K, V, then row 0
    again, as the graphs do) against two index_put_ (K and V together through a [T, 2] row index)."""
    spec = runner.spec
    qkv = torch.randn(
        num_rows,
        (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim,
        dtype=torch.bfloat16,
        device="cuda",
    )
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    k = qkv[:, q_size : q_size + kv_size].view(num_rows, spec.num_kv_heads, spec.head_dim)
    v = qkv[:, q_size + kv_size :].view(num_rows, spec.num_kv_heads, spec.head_dim)
    kv = qkv[:, q_size:].view(num_rows, 2, spec.num_kv_heads, spec.head_dim)
    tok = torch.arange(num_rows, device="cuda")  # tokens on consecutive pages, as a step writes them
    k_rows = tok // PAGE * 2 * PAGE + tok % PAGE
    v_rows = k_rows + PAGE
    kv_rows = torch.stack((k_rows, v_rows), dim=1)
    layers = [runner.pool[i].view(-1, spec.num_kv_heads, spec.head_dim) for i in range(spec.num_layers)]

    def copies() -> None:
        for rows in layers:
            rows.index_copy_(0, k_rows, k)
            rows.index_copy_(0, v_rows, v)
            rows.index_copy_(0, k_rows[:1], k[:1])
            rows.index_copy_(0, v_rows[:1], v[:1])

    def puts() -> None:
        for rows in layers:
            rows.index_put_((kv_rows,), kv)
            rows.index_put_((kv_rows[:1],), kv[:1])

    return {
        "index_copy_x4_ms": time_ms(copies, warmup=2, reps=10),
        "index_put_x2_ms": time_ms(puts, warmup=2, reps=10),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_profile.json"))
    parser.add_argument("--backends", default="fa2,fa3")
    parser.add_argument(
        "--graph-only", action="store_true", help="only the graphed step (no eager profile, no GEMMs alone)"
    )
    args = parser.parse_args(argv)
    copy = copy_tbps()
    result: dict[str, Any] = {"meta": run_metadata(), "copy_tbps": copy}
    spec = spec_from_hf_config(LLAMA3_8B_CONFIG, "random-llama3-8b")
    model = random_model(spec)
    runner = Runner(spec, model, max_tokens=PREFIX + QUESTION + PAGE, fused=True)
    tokens = torch.randint(
        0, spec.vocab_size, (PREFIX + QUESTION,), generator=torch.Generator().manual_seed(0)
    )
    result["cold_10100_ms"] = runner.time_forward(tokens, 0, reps=3)
    runner.forward(tokens[:PREFIX], 0)
    result["eager_cached_ms"] = runner.time_forward(tokens[PREFIX:], PREFIX, reps=10)
    result["weight_read_floor_ms"] = (
        (
            sum(p.numel() * p.element_size() for p in model.parameters())
            - spec.vocab_size * spec.hidden_size * 2
        )
        / (copy * 1e12)
        * 1e3
    )
    print(
        json.dumps({k: result[k] for k in ("cold_10100_ms", "eager_cached_ms", "weight_read_floor_ms")}),
        flush=True,
    )
    for backend in args.backends.split(","):
        fig = result[f"graph_{backend}"] = graph_step_figures(model, runner, tokens, backend)
        fig["speedup_vs_cold"] = result["cold_10100_ms"] / fig["step_ms"]
        print(json.dumps({backend: fig}, indent=1), flush=True)
    if not args.graph_only:
        result["eager_profile"] = eager_profile(runner, tokens)
        result["kv_write_32_layers"] = kv_write_figures(runner)
        result["gemm_alone"] = gemm_figures(model, copy * 1e3)
        print(json.dumps({"gemm_alone": result["gemm_alone"]}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
