"""The fused RoPE + K/V store kernel on the CPU: when the graphs use it, and (where Triton is installed)
its indexing run through Triton's interpreter: rotation, strided inputs, heads that are not a power of
two, padding rows aimed at row 0's slots never written. The interpreter rounds float32 -> bf16 by
truncation (the GPU rounds to nearest), so the reference truncates too; tests/gpu/test_rope_store.py
checks the GPU kernel against FlashInfer's RoPE."""

from __future__ import annotations

import pytest
import torch

from computeworker.model import rope_store


def test_enabled_only_with_cuda_triton_and_a_power_of_two_half(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert rope_store.fused_rope_store_enabled(32, 8, 128)
    assert rope_store.fused_rope_store_enabled(9, 3, 64)
    assert not rope_store.fused_rope_store_enabled(32, 8, 96)  # half of 48: no Triton range
    assert not rope_store.fused_rope_store_enabled(32, 8, 127)
    monkeypatch.setenv("RADIXKV_FUSED_ROPE_STORE", "0")
    assert not rope_store.fused_rope_store_enabled(32, 8, 128)
    monkeypatch.delenv("RADIXKV_FUSED_ROPE_STORE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not rope_store.fused_rope_store_enabled(32, 8, 128)


def _neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return (
        (out.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    )  # truncate, as interpreted


@pytest.mark.parametrize(("hq", "hkv", "d"), [(8, 2, 32), (9, 3, 64)])
def test_interpreted_kernel_rotates_and_stores(
    hq: int, hkv: int, d: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(rope_store, "_KERNEL", None)  # define the kernel under the interpreter
    gen = torch.Generator().manual_seed(0)
    t, real, pages, ps = 7, 4, 10, 4
    qkv = torch.randn((t, (hq + 2 * hkv) * d), generator=gen).to(torch.bfloat16)
    q, k, v = (x.view(t, -1, d) for x in qkv.split((hq * d, hkv * d, hkv * d), dim=-1))
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    angles = torch.randn((64, d // 2), generator=gen)
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    positions = torch.tensor([5, 6, 7, 40, 0, 0, 0])
    k_rows = torch.tensor([3, 8, 9, 17])  # rows of pool.view(-1, hkv, d): (page * 2 + kind) * ps + slot
    rows = torch.empty((t, 2), dtype=torch.int64)
    rows[:real, 0] = k_rows
    rows[real:, 0] = k_rows[0]  # padding aims at row 0's slot
    rows[:, 1] = rows[:, 0] + ps
    pool = torch.zeros((pages, 2, ps, hkv, d), dtype=torch.bfloat16)
    rope_store.rope_and_store(q, k, v, positions, cos_sin, rows, pool)
    cos, sin = cos_sin[positions, : d // 2][:, None], cos_sin[positions, d // 2 :][:, None]
    flat = pool.view(-1, hkv, d)
    assert torch.equal(q, _neox(q0, cos, sin))
    assert torch.equal(flat[k_rows], _neox(k0, cos, sin)[:real])
    assert torch.equal(flat[k_rows + ps], v0[:real])
    written = (flat.abs().sum((1, 2)) > 0).nonzero().flatten()
    assert torch.equal(written, torch.cat((k_rows, k_rows + ps)).sort().values)
