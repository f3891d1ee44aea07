"""What the worker runtime needs to know about the loaded model (bootstrap fills it in)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model's name, KV shape, context, EOS ids and compute dtype."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    context_len: int
    eos_token_ids: tuple[int, ...]
    dtype: str  # the KV dtype the model computes in; the pool must match
