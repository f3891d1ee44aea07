"""fa3 over prefix chunks (computeworker.model.split_extend) on its own: the Triton merge against its
torch reference; the attention against float64 attention over the pool for one planner object replanned
across layouts (long, short and no prefix; one and two sequences; padding), with the compiled scheduler
called directly after the first plan keeping the capture's launch record, with the tail call beside the
chunk call (taking a chunk) and after it (and skipped for a step with
the previous step's lengths); and a plan for a batch that does not fit refused."""

from __future__ import annotations

import pytest
import torch

from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.split_extend import SplitExtendAttention
from computeworker.model.split_merge import merge_partial_states, merge_partial_states_reference
from tests.gpu.test_attention_flashinfer import BF16_REL_TOL, DIM, HEADS, KV_HEADS, PAGE, reference, rel_err

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="fa3 needs sm90"
)


def test_merge_kernel_matches_reference() -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    c, r, h, d = 4, 128, HEADS, DIM
    chunk_out = torch.randn((c, r, h, d), dtype=torch.bfloat16, device="cuda", generator=gen)
    chunk_lse = torch.randn((c, r, h), device="cuda", generator=gen) * 4
    chunk_lse[1] = float("-inf")  # an empty chunk
    tail_out = torch.randn((r, h, d), dtype=torch.bfloat16, device="cuda", generator=gen)
    tail_lse = torch.randn((r, h), device="cuda", generator=gen) * 4
    wide = torch.full((r, h * d + 64), 9.0, dtype=torch.bfloat16, device="cuda")  # a strided output
    out = wide[:, : h * d].view(r, h, d)
    real = torch.tensor([100], dtype=torch.int32, device="cuda")
    merge_partial_states(chunk_out, chunk_lse, tail_out, tail_lse, real, out)
    expected = merge_partial_states_reference(chunk_out, chunk_lse, tail_out, tail_lse, 100)
    assert rel_err(out, expected) < 1e-2
    assert not out[100:].any()
    assert bool((wide[:, h * d :] == 9.0).all())


@pytest.mark.parametrize("tail_takes_a_chunk", [True, False])
def test_replanned_split_attention_matches_float64(tail_takes_a_chunk: bool) -> None:
    gen = torch.Generator(device="cuda").manual_seed(4)
    attn = FlashInferAttention(AttentionShape(HEADS, KV_HEADS, DIM, PAGE), device="cuda")
    num_pages = 1300
    pool = torch.randn(
        (num_pages, 2, PAGE, KV_HEADS, DIM), dtype=torch.bfloat16, device="cuda", generator=gen
    )
    rows = 128
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(0)).tolist()
    pages = (perm[:640], perm[640:1280])
    for batch_size, chunks, steps in (
        (1, 4, [[(0, rows)], [(10_000, 100)], [(10_000, 100)], [(16, 100)], [(5, 2)], [(10_007, 93)]]),
        (2, 2, [[(0, rows - 1), (0, 1)], [(10_000, 60), (37, 20)], [(3, 7), (9_990, 90)]]),
    ):
        split = SplitExtendAttention(
            attn,
            batch_size=batch_size,
            num_rows=rows,
            num_chunks=chunks,
            max_pages=1280,
            tail_takes_a_chunk=tail_takes_a_chunk,
        )
        out = torch.zeros((rows, HEADS, DIM), dtype=torch.bfloat16, device="cuda")
        capture_key = None
        for step in steps:
            chunks_ = [SeqChunk([0] * n, start, pages[i]) for i, (start, n) in enumerate(step)]
            batch = build_forward_batch(chunks_, PAGE, "cuda")
            t = batch.num_tokens
            split.plan(batch.q_lens, batch.kv_lens, batch.kv_page_ids.to(torch.int32))
            if capture_key is None:
                capture_key = split.launch_key
            assert split.launch_key == capture_key, step
            q = torch.randn((t, HEADS, DIM), dtype=torch.bfloat16, device="cuda", generator=gen)
            split.q_copies.normal_(generator=gen)  # stale rows past t must not matter
            split.q_copies[:, :t] = q
            split.attend(pool, out)
            torch.cuda.synchronize()
            err = rel_err(out[:t], reference(batch, q, pool))
            assert err < BF16_REL_TOL, (batch_size, step, err)
            assert not out[t:].any()
        with pytest.raises(ValueError, match="do not fit"):
            split.plan((rows + 1,) + (1,) * (batch_size - 1), (rows + 1,) * batch_size, batch.kv_page_ids)
