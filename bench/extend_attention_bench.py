"""Attention of a small prefill over a cached prefix, alone: FlashInfer's fa2 against fa3 per shape.

    PYTHONPATH=. python3 bench/extend_attention_bench.py --out $OUT/extend_attention.json

Llama-3-8B heads (32 query, 8 KV, head_dim 128, bf16, page 16), 32 layers with their own KV (1.3 GB for
10k tokens: beyond L2, as in the model). Each variant is planned as the extend graphs plan it and its 32
layer calls are captured in one CUDA graph; the figure is the replay's median (device events):

    fa2          FlashInfer's fa2 paged prefill (mma.sync, splits long KV itself, plus its merge kernel)
    fa3          FlashInfer's fa3 paged prefill (wgmma, one CTA per query tile and head, no KV split)
    fa3-split    fa3 over prefix chunks plus the causal tail, merged by log-sum-exp
                 (computeworker.model.split_extend; as many chunks as the extend graphs would use; the
                 q copies are written once before the capture, as RoPE writes them in the model); the
                 tail call takes the last chunk and runs beside the chunk call
    fa3-split-serial  the same with the tail call alone, after the chunk call

The extend graphs' "auto" backend picks from these figures. (Commit 260cb31 measured a Triton split-KV
kernel, `triton:T,N,S,W,P`, removed after its run.)

Also per variant: the host time of plan(), whether a plan for other lengths keeps the capture's launch
record (the graphs need it), a cProfile of plan() (first case), and the error of the last layer's
output against float64 attention.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu_timing import run_metadata, time_ms
from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention, qo_indptr_of
from computeworker.model.extend_graphs import MAX_SPLIT_CHUNKS, graph_prefill_wrapper, plan_launch_key
from computeworker.model.split_extend import SplitExtendAttention
from computeworker.model.split_plan import split_chunks_for

VARIANTS = ("fa2", "fa3", "fa3-split", "fa3-split-serial")
SHAPE = AttentionShape(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16)
NUM_LAYERS = 32
CASES = {  # name: (new tokens per sequence, cached prefix per sequence, sequences, padded rows)
    "1x100_over_10k": (100, 10_000, 1, 128),
    "1x100_over_2k": (100, 2_000, 1, 128),
    "4x25_over_2.5k": (25, 2_500, 4, 128),
    "1x400_over_10k": (400, 10_000, 1, 512),
    "1x200_over_10k": (200, 10_000, 1, 256),
    "1x200_over_2k": (200, 2_000, 1, 256),
    "2x100_over_2k": (100, 2_000, 2, 256),
    "1x500_over_2k": (500, 2_000, 1, 512),
    "4x128_over_2k": (128, 2_000, 4, 512),
    "4x60_over_1k": (60, 1_000, 4, 256),
}


class GraphModePrefill:
    """One FlashInfer graph-mode wrapper for the whole call (fa2 or fa3)."""

    def __init__(self, attention: FlashInferAttention, backend: str, bs: int, max_pages: int) -> None:
        self.attention = attention
        self.wrapper = graph_prefill_wrapper(attention, backend, bs, max_pages)

    @property
    def launch_key(self) -> tuple[int, ...]:
        return plan_launch_key(self.wrapper)

    def plan(self, q_lens: tuple[int, ...], kv_lens: tuple[int, ...], page_ids: torch.Tensor) -> None:
        self.attention.plan_prefill(self.wrapper, qo_indptr_of(q_lens), kv_lens, page_ids)

    def prepare(self, q: torch.Tensor) -> None:
        return None

    def run(self, q: torch.Tensor, kv_layer: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        return self.wrapper.run(q, kv_layer, out=out)


class GraphModeSplit:
    """fa3 over prefix chunks (SplitExtendAttention), chunk count as the extend graphs choose it."""

    def __init__(
        self, attention: FlashInferAttention, bs: int, rows: int, max_pages: int, parallel_tail: bool
    ) -> None:
        num_sms = torch.cuda.get_device_properties(attention.device).multi_processor_count
        parts = split_chunks_for(bs, rows, SHAPE.num_qo_heads, num_sms, MAX_SPLIT_CHUNKS)
        self.split = SplitExtendAttention(
            attention,
            batch_size=bs,
            num_rows=rows,
            num_chunks=parts - 1 if parallel_tail else parts,
            max_pages=max_pages,
            tail_takes_a_chunk=parallel_tail,
        )

    @property
    def launch_key(self) -> tuple[int, ...]:
        return self.split.launch_key

    def plan(self, q_lens: tuple[int, ...], kv_lens: tuple[int, ...], page_ids: torch.Tensor) -> None:
        self.split.plan(q_lens, kv_lens, page_ids)

    def prepare(self, q: torch.Tensor) -> None:
        self.split.q_copies.copy_(q.unsqueeze(0).expand_as(self.split.q_copies))

    def run(self, q: torch.Tensor, kv_layer: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        return self.split.attend(kv_layer, out)


def reference(
    q: torch.Tensor, kv_layer: torch.Tensor, pages: list[list[int]], q_lens, kv_lens
) -> torch.Tensor:
    """float64 causal attention (bottom-right aligned), [rows, H, D]."""
    s = SHAPE
    outs = []
    row = 0
    for seq_pages, q_len, kv_len in zip(pages, q_lens, kv_lens, strict=True):
        kv = kv_layer[torch.tensor(seq_pages, device="cuda")].double()  # [p, 2, ps, KH, D]
        k = kv[:, 0].reshape(-1, s.num_kv_heads, s.head_dim)[:kv_len]
        v = kv[:, 1].reshape(-1, s.num_kv_heads, s.head_dim)[:kv_len]
        k = k.repeat_interleave(s.group_size, dim=1)
        v = v.repeat_interleave(s.group_size, dim=1)
        qs = q[row : row + q_len].double()
        scores = torch.einsum("qhd,khd->hqk", qs, k) / s.head_dim**0.5
        pos = torch.arange(kv_len - q_len, kv_len, device="cuda")[:, None]
        scores = scores.masked_fill(torch.arange(kv_len, device="cuda")[None, :] > pos, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        row += q_len
    return torch.cat(outs)


def run_case(
    name: str, attention: FlashInferAttention, variants: list[str], print_plan_profile: bool
) -> dict[str, Any]:
    q_len, prefix, bs, rows = CASES[name]
    s = SHAPE
    q_lens, kv_lens = (q_len,) * bs, (prefix + q_len,) * bs
    seq_pages = -(-(prefix + q_len) // s.page_size)
    num_pages = bs * seq_pages
    gen = torch.Generator(device="cuda").manual_seed(0)
    pool = torch.randn(
        (NUM_LAYERS, num_pages, 2, s.page_size, s.num_kv_heads, s.head_dim),
        dtype=torch.bfloat16,
        device="cuda",
        generator=gen,
    )
    perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)  # scattered pages
    pages = [perm[i * seq_pages : (i + 1) * seq_pages].tolist() for i in range(bs)]
    q = torch.randn((rows, s.num_qo_heads, s.head_dim), dtype=torch.bfloat16, device="cuda", generator=gen)
    total = sum(q_lens)
    result: dict[str, Any] = {"q_lens": q_lens, "kv_lens": kv_lens, "rows": rows}
    max_pages_per_seq = seq_pages + 4
    for variant in variants:
        impl: GraphModePrefill | GraphModeSplit
        if variant.startswith("fa3-split"):
            impl = GraphModeSplit(attention, bs, rows, bs * max_pages_per_seq, variant == "fa3-split")
        else:
            impl = GraphModePrefill(attention, variant, bs, bs * max_pages_per_seq)
        impl.prepare(q)
        out = torch.zeros((rows, s.num_qo_heads, s.head_dim), dtype=torch.bfloat16, device="cuda")
        # As the extend graphs do: plan the capture layout (all rows in sequence 0, no prefix), run once
        # eagerly, capture, then plan the real step (the launch record must match) and replay.
        cap_q = (rows - bs + 1,) + (1,) * (bs - 1)
        impl.plan(cap_q, cap_q, perm[: sum(-(-n // s.page_size) for n in cap_q)])
        capture_key = impl.launch_key
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for layer in range(NUM_LAYERS):
                impl.run(q, pool[layer], out=out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            for layer in range(NUM_LAYERS):
                impl.run(q, pool[layer], out=out)
        plan_ms = []
        for _ in range(20):
            torch.cuda.synchronize()
            start = time.perf_counter()
            impl.plan(q_lens, kv_lens, perm)
            plan_ms.append((time.perf_counter() - start) * 1e3)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            impl.plan(q_lens, kv_lens, perm)
        profiler.disable()
        torch.cuda.synchronize()
        stats = io.StringIO()
        pstats.Stats(profiler, stream=stats).sort_stats("tottime").print_stats(12)
        ms = time_ms(graph.replay, warmup=3, reps=30)
        graph.replay()
        torch.cuda.synchronize()
        err = (
            (out[:total].double() - reference(q, pool[NUM_LAYERS - 1], pages, q_lens, kv_lens))
            .abs()
            .max()
            .item()
        )
        result[variant] = {
            "ms_32_layers": round(ms, 4),
            "plan_ms": round(statistics.median(plan_ms), 4),
            "launch_key_same_as_capture": impl.launch_key == capture_key,
            "max_abs_err_vs_float64": err,
        }
        print(name, variant, result[variant], flush=True)
        if print_plan_profile:
            print(stats.getvalue()[:3000], flush=True)
    del pool
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--variants", nargs="*", default=["fa2", "fa3", "fa3-split"], choices=list(VARIANTS))
    args = parser.parse_args()
    attention = FlashInferAttention(SHAPE, device="cuda", prefill_backend="fa2")
    report: dict[str, Any] = {"meta": run_metadata(), "cases": {}}
    for name in args.cases:
        report["cases"][name] = run_case(name, attention, args.variants, name == args.cases[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
