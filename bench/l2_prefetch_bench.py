"""Does prefetching the next weights into L2 beside attention shorten the cached step? And does running the
last layer's output projection and MLP on the last token only?

    PYTHONPATH=. python3 bench/l2_prefetch_bench.py --out bench/results/l2_prefetch.json

Two parts, one process, on the random-weight Llama-3-8B-shape model:
1. The output projection's GEMM (128 rows, 4096 x 4096 bf16) alone: after L2 is flushed, cold; after an
   L2 prefetch of its weights (both cache policies) and a ~30 us wait; back to back (weights already in L2).
2. The cached 100-over-10,000 step through the extend graph (default backend), captured once per variant
   (prefetch budget and policy, last-layer pruning) and timed alternating, three rounds each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from bench.gpu_model_bench import LLAMA3_8B_CONFIG, PAGE, Runner, cached_step_runner, random_model
from bench.gpu_timing import copy_tbps, run_metadata, time_ms
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.l2_prefetch import prefetch_to_l2
from shared.model_spec import spec_from_hf_config

MIB = 1 << 20
# name -> (prefetch bytes beside attention, evict_last, prune the last layer)
VARIANTS: dict[str, tuple[int, bool, bool]] = {
    "base": (0, True, False),
    "prune_last_layer": (0, True, True),
    "prefetch_o_evict_last": (32 * MIB, True, False),
    "prefetch_o_plain": (32 * MIB, False, False),
    "prefetch_o_16m_gate_up_evict_last": (48 * MIB, True, False),
    "prefetch_o_evict_last_and_prune": (32 * MIB, True, True),
}


def gemm_figures() -> dict[str, float]:
    """Median us of the 128 x 4096 x 4096 GEMM: cold, after a prefetch (each policy), warm."""
    x = torch.randn(128, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    flush = torch.empty(512 * MIB, dtype=torch.uint8, device="cuda")
    out: dict[str, list[float]] = {"cold": [], "prefetch_evict_last": [], "prefetch_plain": [], "warm": []}
    for _ in range(30):
        for name in out:
            flush.fill_(1)  # evicts L2
            if name.startswith("prefetch"):
                prefetch_to_l2(w, evict_last=name.endswith("last"))
                torch.cuda._sleep(60_000)  # ~30 us at ~2 GHz: the prefetch lands
            elif name == "warm":
                torch.nn.functional.linear(x, w)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.nn.functional.linear(x, w)
            end.record()
            end.synchronize()
            out[name].append(start.elapsed_time(end) * 1e3)
    return {name: statistics.median(times) for name, times in out.items()}


def step_figures(rounds: int) -> dict[str, Any]:
    spec = spec_from_hf_config(LLAMA3_8B_CONFIG, "random-llama3-8b")
    model = random_model(spec)
    runner = Runner(spec, model, max_tokens=10_100 + PAGE, fused=True)
    tokens = torch.randint(0, spec.vocab_size, (10_100,), generator=torch.Generator().manual_seed(0))
    runner.forward(tokens[:10_000], 0)  # the prefix's K/V in its pages, as a cache hit finds them
    pages = list(range((10_100 + PAGE - 1) // PAGE))
    ids = tokens[10_000:].tolist()
    runners = {}
    logits = {}
    for name, (budget, evict_last, prune) in VARIANTS.items():
        cuda = cached_step_runner(model, "auto")
        fused = cuda._fused
        assert fused is not None
        fused.l2_prefetch_bytes, fused.l2_prefetch_evict_last, fused.prune_last_layer = (
            budget,
            evict_last,
            prune,
        )
        cuda.bind(runner.pool, runner.attn)
        runners[name] = cuda
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, cuda in runners.items():

            def step(cuda=cuda) -> torch.Tensor:
                batch = build_forward_batch([SeqChunk(ids, 10_000, pages)], PAGE, "cuda")
                return cuda.forward(batch, runner.pool, runner.attn)

            before = cuda.num_extend_graph_steps
            times[name].append(time_ms(step, warmup=2, reps=20))
            if cuda.num_extend_graph_steps - before < 20:
                raise RuntimeError(f"{name}: not replayed from a graph")
            logits[name] = step().clone()
    base = logits["base"]
    return {
        "step_ms": {name: min(t) for name, t in times.items()},
        "step_ms_all": times,
        "max_abs_logit_diff_vs_base": {name: (v - base).abs().max().item() for name, v in logits.items()},
        "argmax_equal_base": {
            name: bool((v.argmax(-1) == base.argmax(-1)).all()) for name, v in logits.items()
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/l2_prefetch.json"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    props = torch.cuda.get_device_properties(0)
    result: dict[str, Any] = {
        "meta": run_metadata(),
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "copy_tbps": copy_tbps(),
    }
    result["gemm_128x4096x4096_us"] = gemm_figures()
    print(json.dumps(result), file=sys.stderr, flush=True)
    result.update(step_figures(args.rounds))
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
