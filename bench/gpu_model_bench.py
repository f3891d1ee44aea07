"""Our model code (computeworker.model.llama + FlashInferAttention) on a random-weight Llama-3-8B-shape
model in bf16: cold prefill model FLOP/s against the matmul ceiling, and 100 new tokens over a cached
10,000-token prefix against the cold 10,100-token forward.

    PYTHONPATH=. python3 bench/gpu_model_bench.py --out bench/results/gpu_model.json

Also times the model's matmuls alone at the 8k shape (a "matmul only" floor for our shapes), so the
gap between the model and the ceiling splits into matmul shape efficiency and everything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench.gpu_timing import copy_tbps, host_issue_ms, matmul_tflops, run_metadata, time_ms
from computeworker.model import triton_pdl
from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.extend_graphs import DEFAULT_BACKEND
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.fused_mlp import TILES, ShortStepTiles
from computeworker.model.llama import LlamaModel
from computeworker.model.llama_cuda import LlamaCudaForward
from shared.model_spec import ModelSpec, spec_from_hf_config

GRAPH_BACKENDS = (DEFAULT_BACKEND, "fa2")  # the cached step through graphs of each, alternating

if TYPE_CHECKING:
    from computeworker.model.cuda_runner import CudaModelRunner

PAGE = 16
LLAMA3_8B_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def random_model(spec: ModelSpec, seed: int = 0) -> LlamaModel:
    """The model with N(0, 0.02) weights and unit norms, filled through the public load_weight path."""
    model = LlamaModel(spec, dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def fill(name: str, shape: tuple[int, ...]) -> None:
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16, device="cuda")
        else:
            t = torch.empty(shape, dtype=torch.bfloat16, device="cuda").normal_(0.0, 0.02, generator=gen)
        model.load_weight(name, t)

    fill("model.embed_tokens.weight", (spec.vocab_size, spec.hidden_size))
    fill("model.norm.weight", (spec.hidden_size,))
    fill("lm_head.weight", (spec.vocab_size, spec.hidden_size))
    for i, layer in enumerate(model.layers):
        for suffix, (param, start, end) in layer.weight_slots(spec.intermediate_size).items():
            fill(f"model.layers.{i}.{suffix}", (end - start, *param.shape[1:]))
    model.finish_loading()
    return model


@dataclass(frozen=True, slots=True)
class BoundRunner:
    """A random-weight Llama-3-8B-shape model behind the CUDA worker's runner, bound to a pool of its own."""

    spec: ModelSpec
    runner: CudaModelRunner
    pool: torch.Tensor
    attention: FlashInferAttention
    bind_s: float  # warming kernels and capturing graphs


def bound_runner(num_pages: int, max_graph_batch: int) -> BoundRunner:
    """The model as a CUDA worker serves it (CudaModelRunner with its defaults, graphs up to
    max_graph_batch), over a bf16 pool of num_pages pages."""
    from computeworker.model.cuda_runner import CudaModelRunner

    spec = spec_from_hf_config(LLAMA3_8B_CONFIG, name="llama3-8b-shape")
    model = random_model(spec)
    pool = torch.zeros(
        (spec.num_layers, num_pages, 2, PAGE, spec.num_kv_heads, spec.head_dim),
        dtype=torch.bfloat16,
        device="cuda",
    )
    attention = FlashInferAttention(
        AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim, PAGE), device="cuda"
    )
    runner = CudaModelRunner(model, max_graph_batch=max_graph_batch)
    return BoundRunner(spec, runner, pool, attention, runner.bind(pool, attention))


def model_flops(spec: ModelSpec, q_len: int, kv_len: int, num_logits: int = 1) -> float:
    """Matmul FLOPs of one forward over q_len new tokens with kv_len total (causal attention counted
    over the triangle the kernel computes), plus the LM head for `num_logits` tokens."""
    h, d = spec.hidden_size, spec.head_dim
    per_token = _linear_flops_per_token(spec)
    prefix = kv_len - q_len
    attended = q_len * prefix + q_len * (q_len + 1) / 2  # keys seen, summed over the new queries
    attn = 2 * 2 * spec.num_heads * d * attended
    return spec.num_layers * (q_len * per_token + attn) + 2 * h * spec.vocab_size * num_logits


def matmul_only_ms(spec: ModelSpec, model: LlamaModel, q_len: int) -> float:
    """The model's per-layer matmuls at q_len tokens, all layers' weights, nothing else."""
    x = torch.randn(q_len, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    mid = torch.randn(q_len, spec.intermediate_size, dtype=torch.bfloat16, device="cuda")
    attn_out = torch.randn(q_len, spec.num_heads * spec.head_dim, dtype=torch.bfloat16, device="cuda")

    def run() -> None:
        for layer in model.layers:
            torch.nn.functional.linear(x, layer.qkv_weight)
            torch.nn.functional.linear(attn_out, layer.o_weight)
            torch.nn.functional.linear(x, layer.gate_up_weight)
            torch.nn.functional.linear(mid, layer.down_weight)

    return time_ms(run, warmup=2, reps=5)


class Runner:
    """One model, one pool, one attention backend; sequences placed on consecutive pages."""

    def __init__(self, spec: ModelSpec, model: LlamaModel, max_tokens: int, *, fused: bool) -> None:
        self.spec = spec
        self.model = model
        self._forward = LlamaCudaForward(model) if fused else model.forward
        self.num_pages = max_tokens // PAGE + 8
        self.pool = torch.zeros(
            (spec.num_layers, self.num_pages, 2, PAGE, spec.num_kv_heads, spec.head_dim),
            dtype=torch.bfloat16,
            device="cuda",
        )
        shape = AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim, PAGE)
        self.attn = FlashInferAttention(shape, device="cuda")
        self.attn.warmup()

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        kv_len = start_pos + tokens.numel()
        pages = list(range((kv_len + PAGE - 1) // PAGE))
        batch = build_forward_batch([SeqChunk(tokens.tolist(), start_pos, pages)], PAGE, "cuda")
        return self._forward(batch, self.pool, self.attn, False)

    def time_forward(self, tokens: torch.Tensor, start_pos: int, reps: int) -> float:
        """Median ms of the whole forward (batch building included: it is part of serving a request)."""
        return time_ms(lambda: self.forward(tokens, start_pos), warmup=2, reps=reps)


def host_costs_us(spec: ModelSpec, runner: Runner, q_len: int = 100) -> dict[str, float]:
    """Host microseconds to issue one call of each op the cached forward runs per layer (at q_len
    tokens): what a launch-bound forward spends its time on."""
    import flashinfer

    layer = runner.model.layers[0]
    x = torch.randn(q_len, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    res = torch.randn_like(x)
    qkv = torch.randn(q_len, layer.q_size + 2 * layer.kv_size, dtype=torch.bfloat16, device="cuda")
    gate_up = torch.randn(q_len, 2 * spec.intermediate_size, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(q_len, spec.num_heads, spec.head_dim, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(q_len, spec.num_kv_heads, spec.head_dim, dtype=torch.bfloat16, device="cuda")
    cos_sin = torch.randn(16384, spec.head_dim, dtype=torch.float32, device="cuda")
    pos = torch.arange(10_000, 10_000 + q_len, device="cuda")
    pages = list(range((10_000 + q_len + PAGE - 1) // PAGE))
    batch = build_forward_batch([SeqChunk(list(range(q_len)), 10_000, pages)], PAGE, "cuda")
    ops = {
        "linear_qkv": lambda: torch.nn.functional.linear(x, layer.qkv_weight),
        "rmsnorm": lambda: flashinfer.rmsnorm(x, layer.input_norm, 1e-5),
        "fused_add_rmsnorm": lambda: flashinfer.fused_add_rmsnorm(x, res, layer.input_norm, 1e-5),
        "rope_inplace": lambda: flashinfer.apply_rope_with_cos_sin_cache_inplace(
            pos, qkv[:, : layer.q_size], qkv[:, layer.q_size : layer.q_size + layer.kv_size], 128, cos_sin
        ),
        "silu_and_mul": lambda: flashinfer.silu_and_mul(gate_up),
        "attention_forward": lambda: runner.attn.forward(0, q, k, k, runner.pool[0]),
        "attention_begin": lambda: runner.attn.begin(batch),
        "build_forward_batch": lambda: build_forward_batch(
            [SeqChunk(list(range(q_len)), 10_000, pages)], PAGE, "cuda"
        ),
    }
    runner.attn.begin(batch)
    return {name: host_issue_ms(fn, reps=50) * 1e3 for name, fn in ops.items()}


@dataclass(frozen=True)
class GraphOptions:
    """Extra variants of the cached graph step: captured with cuBLASLt GEMMs, with other Triton GEMM tiles
    (a bench/fused_mlp_bench.py result), and how many alternating rounds to time."""

    cublaslt: bool = False
    tiles: ShortStepTiles | None = None
    rounds: int = 3


def model_figures(
    matmul_ceiling_tflops: float,
    copy_ceiling_tbps: float,
    paths: tuple[str, ...] = ("model", "torch_path"),
    options: GraphOptions = GraphOptions(),
    quick: bool = False,
) -> dict[str, Any]:
    """Both forward paths on one model: `model` (LlamaCudaForward, fused kernels) and `torch_path`
    (LlamaModel.forward as wired, the torch ops)."""
    spec = spec_from_hf_config(LLAMA3_8B_CONFIG, "random-llama3-8b")
    model = random_model(spec)
    result = {}
    for key, fused in (("model", True), ("torch_path", False)):
        if key not in paths:
            continue
        result[key] = path_figures(
            spec, model, fused, matmul_ceiling_tflops, copy_ceiling_tbps, options, quick
        )
        print(json.dumps({key: result[key]}), file=sys.stderr, flush=True)
    return result


def path_figures(
    spec: ModelSpec,
    model: LlamaModel,
    fused: bool,
    matmul_ceiling_tflops: float,
    copy_ceiling_tbps: float,
    options: GraphOptions = GraphOptions(),
    quick: bool = False,
) -> dict[str, Any]:
    """The figures of one forward path; `quick` keeps the cold 10,100-token forward and the cached graph
    step only."""
    runner = Runner(spec, model, max_tokens=10_100 + PAGE, fused=fused)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (10_100,), generator=gen)

    nan = float("nan")
    cold8k_flops = model_flops(spec, 8192, 8192)
    cold8k_ms = nan if quick else runner.time_forward(tokens[:8192], 0, reps=5)
    matmul8k_ms = nan if quick else matmul_only_ms(spec, model, 8192)
    cold10k_ms = runner.time_forward(tokens, 0, reps=5)
    runner.forward(tokens[:10_000], 0)  # the prefix's K/V in its pages, as a cache hit finds them
    cached_ms = nan if quick else runner.time_forward(tokens[10_000:], 10_000, reps=20)
    cached_issue_ms = nan if quick else host_issue_ms(lambda: runner.forward(tokens[10_000:], 10_000))
    host_costs = None if quick else host_costs_us(spec, runner)
    graphed = graphed_cached_ms(model, runner, tokens, options) if fused else None
    chunked = (
        {backend: chunked_prefill_ms(model, runner, tokens, backend) for backend in ("fa2", "auto")}
        if fused and not quick
        else None
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - (
        spec.vocab_size * spec.hidden_size * 2  # the embedding table is gathered, not read whole
    )
    return {
        "shape": "llama3-8b (random weights, bf16)",
        "forward": "LlamaCudaForward (FlashInfer fused ops)" if fused else "LlamaModel.forward",
        "cold_8k_ms": cold8k_ms,
        "cold_8k_tflops": cold8k_flops / (cold8k_ms * 1e-3) / 1e12,
        "matmul_ceiling_tflops": matmul_ceiling_tflops,
        "cold_8k_fraction_of_matmul": cold8k_flops / (cold8k_ms * 1e-3) / 1e12 / matmul_ceiling_tflops,
        "target_cold_8k_fraction_of_matmul": 0.75,
        "matmul_only_8k_ms": matmul8k_ms,
        "matmul_only_8k_tflops": spec.num_layers
        * 8192
        * _linear_flops_per_token(spec)
        / (matmul8k_ms * 1e-3)
        / 1e12,
        "cold_10100_ms": cold10k_ms,
        "cached_100_over_10000_ms": cached_ms,
        "cached_host_issue_ms": cached_issue_ms,
        "cached_speedup": cold10k_ms / cached_ms,
        # CudaModelRunner: the same step replayed from an extend CUDA graph (bucket 128, batch building
        # and plan() included; the default attention backend inside the graph, the better of two runs).
        "cached_graph_ms": min(graphed["step_ms"][DEFAULT_BACKEND]) if graphed else None,
        "cached_graph_backend": DEFAULT_BACKEND if fused else None,
        "cached_graph_speedup": cold10k_ms / min(graphed["step_ms"][DEFAULT_BACKEND]) if graphed else None,
        # per round: the cold forward and the default graph step timed back to back
        "cold_10100_ms_by_round": graphed["cold_ms"] if graphed else None,
        "cached_graph_speedup_by_round": [
            round(cold / step, 2)
            for cold, step in zip(graphed["cold_ms"], graphed["step_ms"][DEFAULT_BACKEND], strict=True)
        ]
        if graphed
        else None,
        "round_start_unix": graphed["round_start_unix"] if graphed else None,
        # the same step through each graph variant, alternating (one figure a round), and its host issue
        # time (batch build, plan, input copies, graph launches)
        "cached_graph_ms_by_backend": graphed["step_ms"] if graphed else None,
        "cached_graph_issue_ms": graphed["issue_ms"] if graphed else None,
        # The 10,100-token prompt cold, in 512-token chunks (the worker's default --prefill-chunk) through
        # the extend graphs (buckets 128/256/512): all-fa2 graphs against "auto" (fa3 above 128 tokens).
        "chunked_prefill_512_ms": chunked,
        "host_us_per_call": host_costs,
        "target_cached_speedup": 40.0,
        "weight_read_floor_ms": weight_bytes / (copy_ceiling_tbps * 1e12) * 1e3,
    }


def cached_step_runner(model: LlamaModel, backend: str) -> CudaModelRunner:
    """A CudaModelRunner with one extend graph, one sequence in the 128-token bucket: the cached
    100-over-10,000 step's graph, on the extend attention `backend` (not yet bound to a pool)."""
    from computeworker.model.cuda_runner import CudaModelRunner

    return CudaModelRunner(
        model, max_graph_batch=1, extend_batch_sizes=(1,), extend_token_buckets=(128,), extend_backend=backend
    )


@dataclass(frozen=True)
class GraphVariant:
    """One way of capturing the cached step's graph: attention backend, torch's BLAS library, the fused
    MLP on or off, Triton kernels with or without PDL (None: the default), the fused MLP's tiles."""

    name: str
    backend: str = DEFAULT_BACKEND
    blas: str = "default"
    fused_mlp: bool = True
    pdl: bool | None = None
    tiles: ShortStepTiles = TILES


def graph_variants(options: GraphOptions) -> list[GraphVariant]:
    """The default capture and fa2 attention; without the fused MLP (cuBLAS + FlashInfer kernels); without
    PDL; plus the `options` variants."""
    variants = [GraphVariant(backend, backend) for backend in GRAPH_BACKENDS]
    variants.append(GraphVariant(f"{DEFAULT_BACKEND}_unfused_mlp", fused_mlp=False))
    variants.append(GraphVariant(f"{DEFAULT_BACKEND}_no_pdl", pdl=False))
    if options.cublaslt:  # the default backend, its GEMMs chosen by cuBLASLt when the graphs are captured
        variants.append(GraphVariant(f"{DEFAULT_BACKEND}_cublaslt", blas="cublaslt"))
    if options.tiles is not None:
        variants.append(GraphVariant(f"{DEFAULT_BACKEND}_swept_tiles", tiles=options.tiles))
    return variants


def graphed_cached_ms(
    model: LlamaModel,
    runner: Runner,
    tokens: torch.Tensor,
    options: GraphOptions = GraphOptions(),
) -> dict[str, Any]:
    """Median ms of the cached 100-over-10,000 step through CudaModelRunner's extend graph (batch build
    included), and the median host ms to issue it, per `graph_variants`, measured alternately
    `options.rounds` times each in one process, each round opened by the cold 10,100-token forward (so
    each round's ratio compares the two in the same state of the card: clocks and temperature drift over
    a run): {"step_ms": {variant: [...]}, "issue_ms": {...}, "cold_ms": [...], "round_start_unix": [...]}."""
    # int32 arrays, as the engine holds a request's tokens and page table
    pages = np.arange((10_100 + PAGE - 1) // PAGE, dtype=np.int32)
    ids = tokens[10_000:].numpy().astype(np.int32)
    runners = {}
    for variant in graph_variants(options):
        cuda = cached_step_runner(model, variant.backend)
        if cuda._fused is not None:
            cuda._fused.fused_mlp = cuda._fused.fused_mlp and variant.fused_mlp
            cuda._fused.tiles = variant.tiles
        torch.backends.cuda.preferred_blas_library(variant.blas)
        triton_pdl.force = variant.pdl
        try:
            cuda.bind(runner.pool, runner.attn)
        finally:
            torch.backends.cuda.preferred_blas_library("default")
            triton_pdl.force = None
        runners[variant.name] = cuda
    figures: dict[str, Any] = {
        "step_ms": {name: [] for name in runners},
        "issue_ms": {name: [] for name in runners},
        "cold_ms": [],
        "round_start_unix": [],
    }
    for _ in range(options.rounds):
        figures["round_start_unix"].append(round(time.time(), 3))
        figures["cold_ms"].append(runner.time_forward(tokens, 0, reps=3))
        for name, cuda in runners.items():

            def step(cuda=cuda) -> torch.Tensor:
                batch = build_forward_batch([SeqChunk(ids, 10_000, pages)], PAGE, "cuda")
                return cuda.forward(batch, runner.pool, runner.attn)

            before = cuda.num_extend_graph_steps
            figures["step_ms"][name].append(time_ms(step, warmup=2, reps=20))
            figures["issue_ms"][name].append(host_issue_ms(step, reps=10))
            if cuda.num_extend_graph_steps - before < 30:
                raise RuntimeError(
                    f"{name}: only {cuda.num_extend_graph_steps - before} steps replayed a graph"
                )
    return figures


def chunked_prefill_ms(model: LlamaModel, runner: Runner, tokens: torch.Tensor, backend: str) -> float:
    """Median ms to prefill all of `tokens` cold in 512-token chunks, each over the chunks before it,
    through CudaModelRunner's extend graphs on `backend` (one sequence; batch building included)."""
    from computeworker.model.cuda_runner import CudaModelRunner

    cuda = CudaModelRunner(
        model,
        max_graph_batch=1,
        extend_batch_sizes=(1,),
        extend_token_buckets=(128, 256, 512),
        extend_backend=backend,
    )
    cuda.bind(runner.pool, runner.attn)
    n = tokens.numel()
    pages = list(range((n + PAGE - 1) // PAGE))
    ids = tokens.tolist()

    def prefill() -> None:
        for start in range(0, n, 512):
            chunk = ids[start : start + 512]
            cuda.forward(
                build_forward_batch([SeqChunk(chunk, start, pages)], PAGE, "cuda"), runner.pool, runner.attn
            )

    ms = time_ms(prefill, warmup=1, reps=5)
    if cuda.num_eager_steps:
        raise RuntimeError(f"{cuda.num_eager_steps} chunks ran eagerly")
    return ms


def _linear_flops_per_token(spec: ModelSpec) -> float:
    """qkv + o + gate_up + down matmul FLOPs of one token in one layer."""
    h, d = spec.hidden_size, spec.head_dim
    qkv = 2 * h * (spec.num_heads * d + 2 * spec.num_kv_heads * d)
    return qkv + 2 * spec.num_heads * d * h + 6 * h * spec.intermediate_size


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_model.json"))
    parser.add_argument("--paths", default="model,torch_path", help="which forward paths to measure")
    parser.add_argument(
        "--cublaslt-variant",
        action="store_true",
        help="also time the cached graph captured with cuBLASLt GEMMs",
    )
    parser.add_argument(
        "--tiles-from",
        type=Path,
        help="a bench/fused_mlp_bench.py result: also time the graph with its best tiles",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the cold 10,100-token forward and the graphs only"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of the cached graph variants"
    )
    args = parser.parse_args(argv)
    swept = None
    if args.tiles_from is not None and args.tiles_from.exists():
        from bench.fused_mlp_bench import tiles_from

        swept = tiles_from(args.tiles_from)
    ceilings = {"matmul_bf16_tflops": matmul_tflops(), "copy_tbps": copy_tbps()}
    result: dict[str, Any] = {"meta": run_metadata(), "ceilings": ceilings}
    paths = tuple(args.paths.split(","))
    result.update(
        model_figures(
            ceilings["matmul_bf16_tflops"],
            ceilings["copy_tbps"],
            paths,
            GraphOptions(args.cublaslt_variant, swept, args.rounds),
            args.quick,
        )
    )
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
