"""Sampling time per decode step: the batched sampler (computeworker.engine.sampling) against the
per-row loop it replaced, side by side on one device.

    PYTHONPATH=. python3 bench/sampling_bench.py [--device cuda] [--vocab 128256] [--out FILE.json]

For each batch size and each parameter mix (greedy; temperature 0.8; temperature 0.8 + top_p 0.95;
temperature 0.7 + top_k 50 + top_p 0.9), the median milliseconds of one `sample_batch` call on random
bf16 logits [batch, vocab], from the logits to the token ids on the host (the step's one sync
included). The baseline is the sampler of commit 550b602: greedy rows in one argmax, every other row on
its own (softmax, an argsort for top-k / top-p, one `torch.multinomial` with the request's generator and
an `.item()` sync each).

Also the cost of logits processing (computeworker.engine.logits_processing) on top of the top_p mix: every
row with presence, frequency and repetition penalties and a 16-entry logit_bias, 256 generated tokens
and 2,000 distinct prompt tokens each ("processing/<batch>": processed + sampled vs sampled alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from computeworker.engine.logits_processing import RowHistory, processed_logits
from computeworker.engine.sampling import RowSampling, sample_batch
from shared.protocol import SamplingParams

MIXES: dict[str, SamplingParams] = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature": SamplingParams(temperature=0.8),
    "top_p": SamplingParams(temperature=0.8, top_p=0.95),
    "top_k_top_p": SamplingParams(temperature=0.7, top_k=50, top_p=0.9),
}


def per_row_baseline(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]
) -> list[int]:
    """The sampler this project used before batching (commit 550b602), kept here as the baseline."""
    out = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
    if len(greedy) == len(params):
        return torch.argmax(logits, dim=-1).tolist()
    for i, p in enumerate(params):
        row = logits[i]
        if p.temperature == 0.0:
            out[i] = int(torch.argmax(row).item())
            continue
        scaled = row.float() / p.temperature
        if p.top_k > 0 or p.top_p < 1.0:
            order = torch.argsort(scaled, descending=True, stable=True)
            keep = torch.ones_like(scaled, dtype=torch.bool)
            if 0 < p.top_k < scaled.numel():
                keep[p.top_k :] = False
            if p.top_p < 1.0:
                probs = torch.softmax(scaled[order].masked_fill(~keep, float("-inf")), dim=0)
                keep &= torch.cumsum(probs, dim=0) - probs < p.top_p
            mask = torch.zeros_like(keep)
            mask[order[keep]] = True
            scaled = scaled.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scaled, dim=0)
        out[i] = int(torch.multinomial(probs, 1, generator=gens[i]).item())
    return out


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()  # ends in a host read of the tokens: nothing left in flight
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)


def processing_ms(batch: int, vocab: int, device: torch.device, gen: torch.Generator, reps: int) -> dict:
    """Median ms of processed_logits + sample_batch against sample_batch alone, every row penalised."""
    logits = (torch.randn(batch, vocab, device=device, generator=gen) * 4).to(torch.bfloat16)
    plain = MIXES["top_p"]
    params = msgspec.structs.replace(
        plain,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
        logit_bias={t: 1.0 for t in range(0, vocab, vocab // 16)},
    )
    rng = np.random.default_rng(0)
    histories = [
        RowHistory(
            generated=rng.integers(0, vocab, 256, dtype=np.int32),
            # as the engine passes them: each request's distinct prompt tokens, kept on the device
            prompt_tokens=torch.from_numpy(np.unique(rng.integers(0, vocab, 2000))).to(device),
        )
        for _ in range(batch)
    ]
    rows = [RowSampling(params, seed=i, step=7) for i in range(batch)]
    sampled = time_ms(lambda: sample_batch(logits, rows), device, reps)
    both = time_ms(
        lambda: sample_batch(processed_logits(logits, [params] * batch, histories), rows), device, reps
    )
    return {"sampled": sampled, "processed_and_sampled": both, "processing": round(both - sampled, 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--batch-sizes", default="1,16,64,256")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python3 bench/sampling_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "vocab": args.vocab,
        "ms_per_step": {},
    }
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        # Spread like real logits (a few likely tokens, a long tail), bf16 as the model returns them.
        logits = (torch.randn(batch, args.vocab, device=device, generator=gen) * 4).to(torch.bfloat16)
        for name, params in MIXES.items():
            rows = [RowSampling(params, seed=i, step=7) for i in range(batch)]
            gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
            batched = time_ms(lambda x=logits, rows=rows: sample_batch(x, rows), device, args.reps)
            per_row = time_ms(
                lambda x=logits, ps=[params] * batch, gens=gens: per_row_baseline(x, ps, gens),
                device,
                max(3, args.reps // 3) if batch >= 64 else args.reps,
            )
            result["ms_per_step"][f"{name}/{batch}"] = {
                "batched": batched,
                "per_row_baseline": per_row,
                "speedup": round(per_row / batched, 1),
            }
            print(
                f"{name:12s} batch {batch:4d}: batched {batched:8.3f} ms, per-row {per_row:9.3f} ms",
                flush=True,
            )
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        result["ms_per_step"][f"processing/{batch}"] = processing_ms(
            batch, args.vocab, device, gen, args.reps
        )
        print(f"processing   batch {batch:4d}: {result['ms_per_step'][f'processing/{batch}']}", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
