"""Where a decode step's time goes: B sequences of L cached tokens each, one new token each, on a
random-weight Llama-3-8B-shape model through CudaModelRunner's decode graphs, beside its floor (the
weights plus the batch's K/V read once at the copy rate).

    PYTHONPATH=. python3 bench/decode_profile.py --cases 224x1792,64x2048 --out $OUT/decode_profile.json

Per case: the step as the worker runs it (batch build, plan, graph replay, argmax and the sync that
reads it) in ms; its host parts alone (build, plan + input copies + replay launch); replays
back-to-back (the GPU's time); and a CUPTI profile of the replays, per kernel class (bench.gpu_profile's
classes) with the GPU-busy time and the gaps between kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.gpu_model_bench import LLAMA3_8B_CONFIG, PAGE, Runner, random_model
from bench.gpu_profile import kernel_table
from bench.gpu_timing import copy_tbps, host_issue_ms, run_metadata, time_ms
from computeworker.model.cuda_runner import CudaModelRunner
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.llama import LlamaModel
from shared.model_spec import ModelSpec, spec_from_hf_config


def decode_case(
    spec: ModelSpec, model: LlamaModel, batch_size: int, context: int, copy: float
) -> dict[str, Any]:
    pages_per_seq = (context + 1 + PAGE - 1) // PAGE
    runner = Runner(spec, model, max_tokens=batch_size * pages_per_seq * PAGE, fused=True)
    seqs = [  # int32 arrays, as the engine's requests hold their tokens and page tables
        SeqChunk(
            np.array([7 + i], dtype=np.int32),
            context,
            np.arange(i * pages_per_seq, (i + 1) * pages_per_seq, dtype=np.int32),
        )
        for i in range(batch_size)
    ]

    def build() -> Any:
        return build_forward_batch(seqs, PAGE, "cuda")

    def make_runner() -> CudaModelRunner:
        cuda = CudaModelRunner(
            model, max_graph_batch=batch_size, extend_batch_sizes=(), extend_token_buckets=()
        )
        cuda.bind(runner.pool, runner.attn)
        return cuda

    def step(cuda: CudaModelRunner) -> list[int]:
        logits = cuda.forward(build(), runner.pool, runner.attn)
        return torch.argmax(logits, dim=-1).tolist()

    num_steps = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        cuda = make_runner()  # captured inside the profiler, so CUPTI sees the graph's kernels
        for _ in range(3):
            step(cuda)
        torch.cuda.synchronize()
        with record_function("replays"):
            pass
        for _ in range(num_steps):
            step(cuda)
        torch.cuda.synchronize()
    marks = [e.time_range.start for e in prof.events() if e.name == "replays"]
    table = kernel_table(prof, marks[0] if marks else 0.0, num_steps)

    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(cuda)
        times.append((time.perf_counter() - start) * 1e3)
    batch = build()
    graphs = cuda._graphs
    assert graphs is not None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - (
        spec.vocab_size * spec.hidden_size * 2  # the embedding table is gathered, not read whole
    )
    kv_bytes = batch_size * (context + 1) * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 2
    result = {
        "batch_size": batch_size,
        "context": context,
        "graph_steps": cuda.num_graph_steps,
        "eager_steps": cuda.num_eager_steps,
        "step_ms": round(sorted(times)[len(times) // 2], 3),
        "host_build_ms": round(host_issue_ms(build, reps=20), 3),
        "host_run_issue_ms": round(host_issue_ms(lambda: graphs.run(batch), reps=20), 3),
        "replay_back_to_back_ms": round(time_ms(lambda: graphs.run(batch), warmup=2, reps=10, inner=5), 3),
        "floor_ms": round((weight_bytes + kv_bytes) / (copy * 1e12) * 1e3, 3),
        "weights_floor_ms": round(weight_bytes / (copy * 1e12) * 1e3, 3),
        "kv_floor_ms": round(kv_bytes / (copy * 1e12) * 1e3, 3),
        "profile": table,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="224x1792,64x2048,8x2048", help="BATCHxCONTEXT, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_profile.json"))
    args = parser.parse_args(argv)
    copy = copy_tbps()
    result: dict[str, Any] = {"meta": run_metadata(), "copy_tbps": copy, "cases": []}
    spec = spec_from_hf_config(LLAMA3_8B_CONFIG, "random-llama3-8b")
    model = random_model(spec)
    for case in args.cases.split(","):
        b, ctx = (int(x) for x in case.split("x"))
        fig = decode_case(spec, model, b, ctx, copy)
        gc.collect()  # the case's pool and graphs
        torch.cuda.empty_cache()
        result["cases"].append(fig)
        brief = {k: v for k, v in fig.items() if k != "profile"}
        brief["class_us"] = fig["profile"].get("class_us_per_step")
        brief["busy_us"] = fig["profile"].get("busy_us_per_step")
        brief["kernels"] = fig["profile"].get("num_kernels_per_step")
        print(json.dumps(brief), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
