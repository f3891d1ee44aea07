"""The fused RoPE + K/V store kernel against FlashInfer's RoPE and torch's scatter (the graphs' old path):
q rotated in place and K / V in the pool equal up to one bf16 rounding step (the two kernels may fuse the
multiply-adds differently), padding rows aimed at row 0's slots never written, nothing else touched."""

from __future__ import annotations

import pytest
import torch

from computeworker.model.rope_store import fused_rope_store_enabled, rope_and_store


@pytest.mark.parametrize(("hq", "hkv", "d"), [(32, 8, 128), (9, 3, 64)])
def test_matches_flashinfer_rope_and_scatter(hq: int, hkv: int, d: int) -> None:
    import flashinfer

    assert fused_rope_store_enabled(hq, hkv, d)
    gen = torch.Generator(device="cuda").manual_seed(5)
    t, real, pages, ps = 128, 100, 64, 16
    qkv = torch.randn((t, (hq + 2 * hkv) * d), dtype=torch.bfloat16, device="cuda", generator=gen)
    q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
    positions = torch.randint(0, 20_000, (t,), device="cuda", generator=gen)
    positions[real:] = 0
    inv_freq = 1.0 / (500_000.0 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d))
    angles = torch.arange(20_000, device="cuda", dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).contiguous()
    slots = torch.randperm(pages * ps, device="cuda", generator=gen)[:real]  # distinct (page, slot)
    k_rows = (slots // ps) * 2 * ps + slots % ps
    rows = torch.empty((t, 2), dtype=torch.int64, device="cuda")
    rows[:real, 0] = k_rows
    rows[real:, 0] = k_rows[0]  # padding aims at row 0's slot
    rows[:, 1] = rows[:, 0] + ps
    pool = torch.zeros((pages, 2, ps, hkv, d), dtype=torch.bfloat16, device="cuda")

    ref_q, ref_k = q.clone(), k.clone()
    flashinfer.apply_rope_with_cos_sin_cache_inplace(positions, ref_q, ref_k, d, cos_sin, is_neox=True)
    ref_pool = torch.zeros_like(pool)
    flat_ref = ref_pool.view(-1, hkv, d)
    flat_ref[k_rows] = ref_k[:real].view(-1, hkv, d)
    flat_ref[k_rows + ps] = v[:real].reshape(-1, hkv, d)

    q_heads = q.view(t, hq, d)
    rope_and_store(q_heads, k.view(t, hkv, d), v.view(t, hkv, d), positions, cos_sin, rows, pool)
    torch.cuda.synchronize()

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        diff = (a.float() - b.float()).abs()
        assert float((diff > 0).float().mean()) < 0.01  # rare one-step rounding differences
        assert bool((diff <= b.float().abs() * 2**-7 + 1e-6).all())

    close(q_heads.reshape(t, -1)[:real], ref_q[:real])
    close(pool, ref_pool)
    written = (pool.view(-1, hkv, d).abs().sum((1, 2)) > 0).nonzero().flatten()
    expected = torch.cat((k_rows, k_rows + ps)).sort().values
    assert torch.equal(written, expected)


def test_rotated_q_into_per_chunk_copies() -> None:
    """With q_copies the rotated q lands in each block (rows past T untouched) and q keeps its values;
    K / V are written exactly as without copies."""
    gen = torch.Generator(device="cuda").manual_seed(6)
    t, hq, hkv, d, ps = 100, 32, 8, 128, 16
    qkv = torch.randn((t, (hq + 2 * hkv) * d), dtype=torch.bfloat16, device="cuda", generator=gen)
    q, k, v = (x.view(t, -1, d) for x in qkv.split((hq * d, hkv * d, hkv * d), dim=-1))
    positions = torch.arange(5000, 5000 + t, device="cuda")
    angles = torch.arange(6000, device="cuda", dtype=torch.float32)[:, None] * torch.rand(
        d // 2, device="cuda"
    )
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).contiguous()
    rows = torch.empty((t, 2), dtype=torch.int64, device="cuda")
    rows[:, 0] = (torch.arange(t, device="cuda") // ps) * 2 * ps + torch.arange(t, device="cuda") % ps
    rows[:, 1] = rows[:, 0] + ps
    pool_a = torch.zeros((-(-t // ps), 2, ps, hkv, d), dtype=torch.bfloat16, device="cuda")
    pool_b = torch.zeros_like(pool_a)
    q_before = q.clone()
    copies = torch.full((4, 128, hq, d), 7.0, dtype=torch.bfloat16, device="cuda")
    rope_and_store(q, k, v, positions, cos_sin, rows, pool_a, q_copies=copies)
    assert torch.equal(q, q_before)
    q_in_place = q.clone()
    rope_and_store(q_in_place, k, v, positions, cos_sin, rows, pool_b)
    torch.cuda.synchronize()
    for c in range(4):
        assert torch.equal(copies[c, :t], q_in_place)
    assert bool((copies[:, t:] == 7.0).all())
    assert torch.equal(pool_a, pool_b)
    with pytest.raises(ValueError, match="contiguous"):
        rope_and_store(q, k, v, positions, cos_sin, rows, pool_a, q_copies=copies[:, :50])
