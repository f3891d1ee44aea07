"""Fixtures for the worker tests: a real shm pool, a toy tokenizer, a counting model."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence

import pytest
import torch

from computeworker.model.batch import ForwardBatch
from shared.detokenizer import IncrementalDetokenizer
from shared.kv_layout import KVLayout
from shared.pool import MappedPool, create_pool, map_pool


@pytest.fixture
def shm_pool() -> Iterator[MappedPool]:
    """A real shared-memory pool: 2 layers, 32 pages of 4 slots, 1 kv head of dim 8."""
    layout = KVLayout(num_layers=2, num_pages=32, page_size=4, num_kv_heads=1, head_dim=8)
    owned = create_pool(layout, "shm", name=f"wtest-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    mapped = map_pool(owned.descriptor())
    yield mapped
    mapped.close()
    owned.close()


class LetterTokenizer:
    """Token i is the letter chr(ord('a') + i % 26); enough to drive the detokenizer and stop strings."""

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.decode, prompt_ids)


class CountingModel:
    """Predicts (last fed token + 1) % vocab for every sequence and records each batch it saw."""

    def __init__(self, vocab_size: int = 64) -> None:
        self.vocab_size = vocab_size
        self.batches: list[ForwardBatch] = []

    def forward(
        self, batch: ForwardBatch, kv_pool: torch.Tensor, attention: object, all_logits: bool = False
    ) -> torch.Tensor:
        self.batches.append(batch)
        last = batch.input_ids[(batch.qo_indptr[1:] - 1).long()]
        logits = torch.zeros(batch.num_seqs, self.vocab_size)
        logits[torch.arange(batch.num_seqs), (last + 1) % self.vocab_size] = 1.0
        return logits
