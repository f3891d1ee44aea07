"""Which steps the extend CUDA graphs take (host-side rules, no GPU needed)."""

from __future__ import annotations

from computeworker.model.extend_graphs import extend_fits, pick_bucket
from computeworker.model.forward_batch import SeqChunk, build_forward_batch

PAGE = 16


def fits(chunks: list[SeqChunk], max_pages: int = 8) -> bool:
    batch = build_forward_batch(chunks, PAGE, "cpu")
    return extend_fits(
        batch, batch_sizes=(1, 2), token_buckets=(32, 64), page_size=PAGE, max_pages_per_seq=max_pages
    )


def test_pick_bucket_takes_the_smallest_that_holds_the_tokens() -> None:
    assert [pick_bucket(n, (32, 64)) for n in (1, 32, 33, 64, 65)] == [32, 32, 64, 64, None]


def test_extend_fits_sequence_counts_token_buckets_and_pages() -> None:
    pages = list(range(8))
    assert fits([SeqChunk([5] * 20, 40, pages)])  # 100 new over a cached prefix
    assert fits([SeqChunk([5] * 10, 60, pages), SeqChunk([6] * 54, 40, pages)])  # 64 tokens, 2 seqs
    assert not fits([SeqChunk([5] * 65, 0, pages)])  # more tokens than the largest bucket
    assert not fits([SeqChunk([5] * 2, 0, pages)] * 3)  # 3 sequences: not captured
    assert not fits([SeqChunk([5], 40, pages)])  # pure decode: the decode graphs take it
    assert not fits([SeqChunk([5] * 20, 40, pages)], max_pages=3)  # 60 tokens need 4 pages
    assert fits([SeqChunk([5], 40, pages), SeqChunk([6] * 3, 40, pages)])  # mixed decode + extend
