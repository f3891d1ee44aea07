"""Turn a WorkerConfig into a ready WorkerRuntime: torch threads, model, tokenizer, attention backend.

On CUDA the model is wrapped in a CudaModelRunner (fused forward, decode CUDA graphs, kernels warmed
when the pool is mapped) and the engine fences commits with CUDA events (computeworker.engine.fences).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from computeworker.config import WorkerConfig
from computeworker.engine.fences import StepStats
from computeworker.engine.structured import StructuredDecoding
from computeworker.model.batch import AttentionBackend
from computeworker.model_info import ModelInfo
from computeworker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_runtime(config: WorkerConfig) -> WorkerRuntime:
    """Load everything the worker needs (slow: reads the weights). Raises ValueError for a model or
    device it cannot use."""
    from computeworker.model.loader import load_model
    from shared.default_model import default_model_path
    from shared.tokenizer import load_tokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {config.device} requested but CUDA is not available")
    path = config.model_path or default_model_path()
    dtype = _DTYPES[config.resolved_dtype]
    device = torch.device(config.device)
    if config.random_weights:
        from computeworker.model.random_weights import random_model

        model, spec = random_model(path, dtype, device, seed=config.seed)
    else:
        model, spec = load_model(path, dtype, device, progress=True)
    tokenizer = load_tokenizer(path)
    eos = tuple(sorted(set(spec.eos_token_ids) | set(tokenizer.eos_token_ids)))
    info = ModelInfo(
        name=spec.name,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        context_len=spec.max_position_embeddings,
        eos_token_ids=eos,
        dtype=config.resolved_dtype,
    )
    log.info(
        "loaded %s on %s (%s%s)",
        spec.name,
        device,
        config.resolved_dtype,
        f", random weights seed {config.seed}" if config.random_weights else "",
    )
    on_step = _log_step if config.log_steps else None
    structured = StructuredDecoding.for_tokenizer(tokenizer.backend, spec.vocab_size, eos)
    make_attention = attention_factory(spec, device, dtype)
    if device.type != "cuda":
        return WorkerRuntime(
            config, model, make_attention, tokenizer, info, on_step=on_step, structured=structured
        )
    from computeworker.engine.fences import cuda_fence_factory
    from computeworker.model.cuda_runner import CudaModelRunner

    runner = CudaModelRunner(
        model,
        cuda_graphs=config.cuda_graphs,
        max_graph_batch=config.max_graph_batch or config.max_running,
        extend_backend=config.extend_attention,
    )
    return WorkerRuntime(
        config,
        runner,
        make_attention,
        tokenizer,
        info,
        on_pool=runner.bind,
        make_fence=cuda_fence_factory(device),
        on_step=on_step,
        structured=structured,
    )


def _log_step(stats: StepStats) -> None:
    log.info(
        "step seqs=%d tokens=%d prefill=%d cached=%d ms=%.3f",
        stats.num_seqs,
        stats.num_tokens,
        stats.num_prefill_tokens,
        stats.num_cached_tokens,
        stats.seconds * 1e3,
    )


def attention_factory(
    spec: Any, device: torch.device, dtype: torch.dtype
) -> Callable[[int], AttentionBackend]:
    """page_size -> backend: FlashInfer on CUDA in 16-bit when it is installed, else the torch
    reference backend (CPU, fp32, or no flashinfer)."""
    from computeworker.model.attention_torch import TorchAttention

    def make(page_size: int) -> AttentionBackend:
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            try:
                from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention

                shape = AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim, page_size)
                return FlashInferAttention(shape, device=device, dtype=dtype)
            except ImportError:
                log.warning("flashinfer is not installed: torch reference attention on %s", device)
        return TorchAttention()

    return make
