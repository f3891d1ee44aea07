"""Helpers shared by the model tests: drive our model over the paged pool and compare with transformers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from computeworker.model.attention_torch import TorchAttention
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.llama import LlamaModel

PAGE = 16
REL_TOL = 1e-4


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to max |ref|."""
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def new_pool(model: LlamaModel, num_pages: int) -> torch.Tensor:
    s = model.spec
    # NaN, not zeros: a read of a slot nobody wrote would poison the logits instead of hiding
    return torch.full((s.num_layers, num_pages, 2, PAGE, s.num_kv_heads, s.head_dim), float("nan"))


def forward(
    model: LlamaModel,
    pool: torch.Tensor,
    chunks: Sequence[SeqChunk],
    *,
    all_logits: bool = False,
) -> torch.Tensor:
    batch = build_forward_batch(chunks, PAGE, "cpu")
    return model.forward(batch, pool, TorchAttention(), all_logits=all_logits)


def hf_logits(hf_model: torch.nn.Module, tokens: Sequence[int]) -> torch.Tensor:
    """transformers' logits at every position of `tokens` (one uncached pass): [len, vocab]."""
    with torch.no_grad():
        return hf_model(torch.tensor([list(tokens)])).logits[0].float()


def check_against_reference(
    model: LlamaModel, ref: torch.Tensor, tokens: Sequence[int], prefill_len: int, split: int
) -> None:
    """Prefill `prefill_len` tokens, decode the rest one by one, then redo the prefill in two chunks
    where the second sequence reuses the first chunk's pages (a cache hit). Every logit row within
    REL_TOL of `ref`. `split` must be a multiple of PAGE (only full pages are shared)."""
    pool = new_pool(model, 32)
    pages = list(range(1, 16))  # page 0 left unwritten on purpose
    out = forward(model, pool, [SeqChunk(tokens[:prefill_len], 0, pages)], all_logits=True)
    assert out.shape == (prefill_len, model.spec.vocab_size)
    assert rel_err(out, ref[:prefill_len]) < REL_TOL
    for pos in range(prefill_len, len(tokens)):
        step = forward(model, pool, [SeqChunk([tokens[pos]], pos, pages)])
        assert step.shape == (1, model.spec.vocab_size)
        assert rel_err(step[0], ref[pos]) < REL_TOL, f"decode step at position {pos}"

    # Cache hit: a second request shares pages[:split // PAGE] and computes only the suffix
    shared = pages[: split // PAGE]
    own = list(range(16, 32))
    suffix = forward(model, pool, [SeqChunk(tokens[split:prefill_len], split, shared + own)], all_logits=True)
    assert rel_err(suffix, ref[split:prefill_len]) < REL_TOL
