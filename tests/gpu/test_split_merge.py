"""The Triton merge of split attention results against the PyTorch reference (split_merge)."""

from __future__ import annotations

import torch

from computeworker.model.split_merge import merge_split_states, merge_split_states_reference


def test_triton_merge_matches_reference() -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    chunks, rows, heads, dim, batch = 4, 40, 32, 128, 3
    kw = dict(device="cuda", generator=gen)
    tail_out = torch.randn((rows, heads, dim), dtype=torch.bfloat16, **kw)
    tail_lse = torch.randn((rows, heads), dtype=torch.float32, **kw) * 4
    chunk_out = torch.randn((chunks, rows, heads, dim), dtype=torch.bfloat16, **kw)
    chunk_lse = torch.randn((chunks, rows, heads), dtype=torch.float32, **kw) * 4
    row_seq = torch.tensor([0] * 10 + [1] * 15 + [2] * 10 + [batch] * 5, dtype=torch.int32, device="cuda")
    chunk_valid = torch.ones((chunks, batch + 1), dtype=torch.int32, device="cuda")
    chunk_valid[:, batch] = 0
    chunk_valid[2:, 1] = 0  # sequence 1 has only two chunks of prefix
    chunk_lse[2:, 10:25] = float("nan")  # what an invalid chunk holds must not matter
    out = torch.full((rows, heads, dim), float("nan"), dtype=torch.bfloat16, device="cuda")
    merge_split_states(tail_out, tail_lse, chunk_out, chunk_lse, row_seq, chunk_valid, out)
    expected = merge_split_states_reference(tail_out, tail_lse, chunk_out, chunk_lse, row_seq, chunk_valid)
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out[35:], tail_out[35:])  # padding rows: the tail result alone
