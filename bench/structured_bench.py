"""What structured output costs a decode step: the same batch of decoding requests through the worker's
Engine, free (the baseline) and constrained by a JSON schema, side by side in one process.

    CUDA: a random-weight Llama-3-8B-shape model through the CUDA worker's runner (decode graphs,
          FlashInfer), logits 128,256 wide; the grammar vocabulary is a real BPE tokenizer's (--tokenizer,
          SmolLM2's by default) with the ids past it never allowed.
    CPU:  the embedded SmolLM2-135M (fp32, torch attention), its own tokenizer.

Every request: a 128-token prompt, greedy, up to --steps tokens; the schema is a tool call's arguments,
so rows move through keys, strings, numbers and an enum. Reported per batch size: the median decode step
(ms, StepStats.seconds) free and constrained, the difference, and the host time to fill one row's bitmask
(the engine fills them while the GPU runs the forward pass; see computeworker.engine.structured).

    python -m bench.structured_bench --out bench/results/structured.json [--tokenizer tok.json(.gz)]
    python -m bench.structured_bench --export-tokenizer tok.json.gz    (for a GPU machine: gpu_session.sh)
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import json
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from computeworker.engine.engine import Engine, EngineConfig
from computeworker.engine.fences import StepStats
from computeworker.engine.structured import StructuredDecoding
from shared.ids import ids_to_bytes
from shared.protocol import Commit, CommitAck, Dispatch, SamplingParams, StructuredOutput

PAGE = 16
PROMPT = 128
TOOL_CALL = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "units": {"enum": ["metric", "imperial"]},
        "hourly": {"type": "boolean"},
    },
    "required": ["city", "days", "units", "hourly"],
}
SCHEMA = StructuredOutput("json_schema", json.dumps(TOOL_CALL))


class _NoDetokenizer:
    def detokenizer(self, prompt: list[int]) -> Any:
        raise AssertionError("no stop strings in this bench")


@dataclass
class Setup:
    """A model, its pool and attention, and the grammar engine for its logits."""

    model: Any
    attention: Any
    pool: torch.Tensor
    context_len: int
    eos: tuple[int, ...]
    structured: StructuredDecoding
    vocab: int  # the tokenizer's: prompt ids are drawn below it
    describe: dict[str, Any]


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 3) if values else float("nan")


def load_tokenizer_file(path: Path) -> Any:
    from tokenizers import Tokenizer

    raw = path.read_bytes()
    return Tokenizer.from_str((gzip.decompress(raw) if path.suffix == ".gz" else raw).decode())


def cuda_setup(tokenizer_path: Path | None, max_batch: int) -> Setup:
    from bench.gpu_model_bench import bound_runner
    from bench.gpu_timing import run_metadata

    backend = load_tokenizer_file(tokenizer_path) if tokenizer_path else _default_tokenizer().backend
    bound = bound_runner(max_batch * -(-(PROMPT + 256) // PAGE) + 16, max_batch)
    spec, runner, pool, attention = bound.spec, bound.runner, bound.pool, bound.attention
    eos = (backend.token_to_id("<|endoftext|>") or 0,)
    return Setup(
        runner,
        attention,
        pool,
        spec.max_position_embeddings,
        eos,
        StructuredDecoding.for_tokenizer(backend, spec.vocab_size, eos),
        backend.get_vocab_size(),
        {"meta": run_metadata(), "model": "llama3-8b-shape random bf16", "logits": spec.vocab_size},
    )


def cpu_setup(max_batch: int) -> Setup:
    from computeworker.model.attention_torch import TorchAttention
    from computeworker.model.loader import load_model
    from shared.default_model import default_model_path

    tokenizer = _default_tokenizer()
    model, spec = load_model(default_model_path(), torch.float32, "cpu", progress=False)
    pages = max_batch * -(-(PROMPT + 256) // PAGE) + 16
    pool = torch.zeros((spec.num_layers, pages, 2, PAGE, spec.num_kv_heads, spec.head_dim))
    eos = tuple(tokenizer.eos_token_ids)
    meta = {"card": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}
    return Setup(
        model,
        TorchAttention(),
        pool,
        spec.max_position_embeddings,
        eos,
        StructuredDecoding.for_tokenizer(tokenizer.backend, spec.vocab_size, eos),
        tokenizer.vocab_size,
        {"meta": meta, "model": "SmolLM2-135M fp32", "logits": spec.vocab_size},
    )


def _default_tokenizer() -> Any:
    from shared.default_model import default_model_path
    from shared.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


def decode_steps(
    setup: Setup, batch: int, structured: StructuredOutput | None, steps: int
) -> list[StepStats]:
    """Run `batch` requests to `steps` decode steps; the StepStats of the decode steps."""
    stats: list[StepStats] = []
    config = EngineConfig(
        page_size=PAGE,
        context_len=setup.context_len,
        eos_token_ids=setup.eos,
        max_running=batch,
        prefill_chunk=8192,
    )
    engine = Engine(
        setup.model, setup.attention, setup.pool, _NoDetokenizer(), config, on_step=stats.append,
        structured=setup.structured,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(batch)
    per_request = -(-(PROMPT + steps + 2) // PAGE)
    sampling = SamplingParams(temperature=0.0, max_tokens=steps, structured=structured)
    for i in range(batch):
        prompt = torch.randint(3, setup.vocab, (PROMPT,), generator=gen).tolist()
        pages = list(range(i * per_request, (i + 1) * per_request))
        engine.add(
            Dispatch(i.to_bytes(16, "big"), ids_to_bytes(prompt), 0, b"", ids_to_bytes(pages), sampling)
        )
    while engine.has_work() or engine.pending_fence() is not None:
        engine.step()
        if setup.pool.is_cuda:
            torch.cuda.synchronize()
        for msg in engine.take_messages():
            if isinstance(msg, Commit):  # the tree keeps the worker's own pages
                engine.on_commit_ack(CommitAck(msg.request_id, msg.page_ids))
    engine.reset()
    return [s for s in stats if s.num_prefill_tokens == 0 and s.num_seqs == batch]


def fill_ms_per_row(setup: Setup, rows: int = 64, steps: int = 32) -> float:
    """Host ms to fill one row's bitmask, rows moving through a tool call's JSON token by token."""
    from shared.grammar import xgrammar

    xgr = xgrammar()
    text = json.dumps({"city": "San Francisco Bay Area", "days": 7, "units": "metric", "hourly": True})
    backend = setup.structured  # the same vocabulary the engine uses
    matchers = [backend.start(SCHEMA).matcher for _ in range(rows)]
    bitmask = xgr.allocate_token_bitmask(rows, setup.structured.vocab_size)
    tokens = _encode(text)
    times = []
    for token in tokens[:steps]:
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        times.append((time.perf_counter() - start) / rows)
        if not all(m.accept_token(token) for m in matchers):
            raise AssertionError(f"the grammar refused token {token} of {text!r}")
    return round(statistics.median(times) * 1e3, 4)


_ENCODE: Callable[[str], list[int]] | None = None


def _encode(text: str) -> list[int]:
    assert _ENCODE is not None
    return _ENCODE(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global _ENCODE
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", default="1,16,64,128")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per request")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (or .gz) for CUDA")
    parser.add_argument("--out", type=Path, default=Path("bench/results/structured.json"))
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the constrained steps at the largest batch"
    )
    parser.add_argument(
        "--export-tokenizer", type=Path, help="write the embedded model's tokenizer (gzip) here and exit"
    )
    args = parser.parse_args(argv)
    if args.export_tokenizer:  # for a GPU machine without the model: carry this file there
        args.export_tokenizer.write_bytes(gzip.compress(_default_tokenizer().backend.to_str().encode()))
        return {}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    setup = cuda_setup(args.tokenizer, max(sizes)) if torch.cuda.is_available() else cpu_setup(max(sizes))
    backend = load_tokenizer_file(args.tokenizer) if args.tokenizer else _default_tokenizer().backend
    _ENCODE = lambda text: backend.encode(text, add_special_tokens=False).ids  # noqa: E731
    setup.structured.compiled(SCHEMA)  # load the grammar engine outside the timed steps
    results: dict[str, Any] = {
        **setup.describe,
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "rows": [],
    }
    results["fill_ms_per_row"] = fill_ms_per_row(setup)
    print("fill ms per row", results["fill_ms_per_row"], flush=True)
    mask_seconds: list[float] = []
    idle_at_mask: list[bool] = []  # was the GPU already done with the forward when the mask began?
    mask = setup.structured.mask

    def timed_mask(logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if logits.is_cuda:
            idle_at_mask.append(torch.cuda.current_stream().query())
        start = time.perf_counter()
        out = mask(logits, *args, **kwargs)
        mask_seconds.append(time.perf_counter() - start)
        return out

    setup.structured.mask = timed_mask  # type: ignore[method-assign]
    threads = setup.structured.fill_threads
    modes = {"free": (None, threads), "json_schema": (SCHEMA, threads), "json_schema_1_thread": (SCHEMA, 1)}
    for batch in sizes:
        decode_steps(setup, batch, None, 4)  # warm this batch size's graphs and kernels
        steps: dict[str, list[float]] = {name: [] for name in modes}
        masks: dict[str, list[float]] = {name: [] for name in modes}
        phases: dict[str, list[StepStats]] = {name: [] for name in modes}
        idle: dict[str, list[bool]] = {name: [] for name in modes}
        for _ in range(2):  # alternate, so drift hits both
            for name, (structured, fill_threads) in modes.items():
                setup.structured.fill_threads = fill_threads
                mask_seconds.clear()
                idle_at_mask.clear()
                stats = decode_steps(setup, batch, structured, args.steps)
                steps[name] += [s.seconds for s in stats]
                phases[name] += stats
                masks[name] += mask_seconds
                idle[name] += idle_at_mask
        row: dict[str, Any] = {"batch": batch}
        for name in modes:
            row[f"{name}_step_ms"] = _median_ms(steps[name])
            row[f"{name}_build_issue_sample_ms"] = [
                _median_ms([getattr(st, f) for st in phases[name]])
                for f in ("build_s", "forward_s", "sample_s")
            ]
            if name != "free":
                row[f"{name}_overhead_ms"] = round(row[f"{name}_step_ms"] - row["free_step_ms"], 3)
                row[f"{name}_mask_host_ms"] = _median_ms(masks[name])
                if idle[name]:
                    row[f"{name}_gpu_idle_at_mask"] = round(sum(idle[name]) / len(idle[name]), 2)
        row["steps_measured"] = {name: len(v) for name, v in steps.items()}
        results["rows"].append(row)
        print(row, flush=True)
    results["fill_threads"] = threads
    if args.profile:  # where a constrained step's host time goes, at the largest batch
        setup.structured.fill_threads = threads
        profiler = cProfile.Profile()
        profiler.enable()
        decode_steps(setup, max(sizes), SCHEMA, args.steps)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        results["profile"] = text.getvalue()
        print(results["profile"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
