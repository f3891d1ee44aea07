"""The Triton prefill's plan table (CPU: pure Python), checked field by field, and its shape rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from computeworker.model.attention_triton import (
    SEQ_FIELDS,
    TILE_FIELDS,
    TritonPrefillConfig,
    max_tiles,
    plan_tables,
    supports,
)


def _split(table: np.ndarray, max_seqs: int) -> tuple[int, np.ndarray, np.ndarray]:
    seqs = table[1 : 1 + SEQ_FIELDS * max_seqs].reshape(max_seqs, SEQ_FIELDS)
    tiles = table[1 + SEQ_FIELDS * max_seqs :].reshape(-1, TILE_FIELDS)
    return int(table[0]), seqs, tiles


def test_one_long_prefix() -> None:
    table = plan_tables([100], [10_100], 16, max_seqs=1, max_tokens=128, block_tokens=16)
    total, seqs, tiles = _split(table, 1)
    assert total == 100
    assert seqs.tolist() == [[0, 100, 10_100, 0]]
    assert tiles.tolist() == [[0, t] for t in range(0, 100, 16)] + [[-1, 0]]


def test_sequences_get_their_own_tiles_and_pages() -> None:
    table = plan_tables([25, 3, 40], [2_525, 3, 57], 16, max_seqs=4, max_tokens=128, block_tokens=16)
    total, seqs, tiles = _split(table, 4)
    assert total == 68
    # q_start, q_len, kv_len, first page (2,525 tokens = 158 pages, 3 tokens = 1 page)
    assert seqs.tolist() == [[0, 25, 2_525, 0], [25, 3, 3, 158], [28, 40, 57, 159], [0, 0, 0, 0]]
    used = [t for t in tiles.tolist() if t[0] >= 0]
    assert used == [[0, 0], [0, 16], [1, 25], [2, 28], [2, 44], [2, 60]]
    assert len(tiles) == max_tiles(128, 4, 16) == 11


@given(
    lens=st.lists(st.tuples(st.integers(1, 64), st.integers(0, 5_000)), min_size=1, max_size=4),
    block_tokens=st.sampled_from([8, 16, 32]),
)
def test_tiles_cover_every_token_once(lens: list[tuple[int, int]], block_tokens: int) -> None:
    q_lens = [q for q, _ in lens]
    kv_lens = [q + prefix for q, prefix in lens]
    table = plan_tables(q_lens, kv_lens, 16, max_seqs=4, max_tokens=256, block_tokens=block_tokens)
    total, seqs, tiles = _split(table, 4)
    covered = []
    for seq, first in tiles.tolist():
        if seq < 0:
            continue
        q_start, q_len = seqs[seq, 0], seqs[seq, 1]
        covered += range(first, min(first + block_tokens, q_start + q_len))
    assert covered == list(range(total)) and total == sum(q_lens)


@pytest.mark.parametrize(
    ("q_lens", "kv_lens", "match"),
    [
        ([], [], "1..2 sequences"),
        ([1, 1, 1], [1, 1, 1], "1..2 sequences"),
        ([4], [4, 4], "1..2 sequences"),
        ([0], [10], "q_len <= kv_len"),
        ([5], [4], "q_len <= kv_len"),
        ([100, 100], [100, 100], "exceed"),
    ],
)
def test_bad_batches_raise(q_lens: list[int], kv_lens: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_tables(q_lens, kv_lens, 16, max_seqs=2, max_tokens=128, block_tokens=16)


def test_supported_shapes() -> None:
    keys = TritonPrefillConfig().block_keys
    assert supports(32, 8, 128, 16, keys)  # Llama-3-8B
    assert not supports(9, 3, 64, 16, keys)  # SmolLM2-135M: group of 3
    assert not supports(32, 8, 128, 48, keys)  # a key block must hold whole pages
