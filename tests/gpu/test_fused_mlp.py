"""The fused MLP of short steps (computeworker.model.fused_mlp): its kernels against float64, the fused add
+ RMSNorm against FlashInfer's, and the fused forward's logits at 100 tokens against transformers and
against the same forward with the fusion off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.fused_mlp import (
    TILES,
    GemmTiles,
    add_partials_rmsnorm,
    fused_mlp_applies,
    gate_up_silu,
    linear_partials,
    mlp_partials,
)
from tests.gpu.test_model_gpu import BF16_LOGITS_REL_TOL, model_dir, new_pool, prompt, rel_err

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs sm90+"
)
__all__ = ["model_dir"]  # the transformers model fixture, shared with test_model_gpu


def mlp_reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.double().chunk(2, dim=0)
    x = x.double()
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.double().T


@pytest.mark.parametrize(("rows", "hidden", "inter"), [(65, 256, 512), (100, 1024, 2048), (128, 4096, 14336)])
def test_mlp_partials_match_float64(rows: int, hidden: int, inter: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, hidden, device="cuda", generator=gen).bfloat16()
    gate_up = (torch.randn(2 * inter, hidden, device="cuda", generator=gen) * hidden**-0.5).bfloat16()
    down = (torch.randn(hidden, inter, device="cuda", generator=gen) * inter**-0.5).bfloat16()
    assert fused_mlp_applies(rows, hidden, inter, x)
    partials = mlp_partials(x, gate_up, down)
    expected = mlp_reference(x, gate_up, down)
    assert partials.dtype == torch.float32 and partials.shape[1:] == (rows, hidden)
    # The unfused path (bf16 intermediate, bf16 output) sets the bar the fused one must meet.
    unfused = torch.nn.functional.linear(
        torch.nn.functional.silu(x @ gate_up[:inter].T) * (x @ gate_up[inter:].T), down
    )
    assert rel_err(partials.sum(0), expected) <= max(rel_err(unfused, expected) * 1.5, 1e-3)


@pytest.mark.parametrize(
    "tiles",
    [TILES.down, GemmTiles(128, 64, 4, 4, 8, tma=True), GemmTiles(64, 64, 2, 4, 4, tma=True)],
    ids=["pointer", "tma-split4", "tma-split2"],
)
@pytest.mark.parametrize("rows", [65, 100, 128])
def test_linear_partials_match_float64(tiles: GemmTiles, rows: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 4096, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(1024, 4096, device="cuda", generator=gen) * 4096**-0.5).bfloat16()
    partials = linear_partials(x, w, tiles)
    assert partials.shape == (tiles.split, rows, 1024) and partials.dtype == torch.float32
    expected = x.double() @ w.double().T
    assert rel_err(partials.sum(0), expected) <= max(
        rel_err(torch.nn.functional.linear(x, w), expected), 1e-3
    )
    with pytest.raises(ValueError, match="does not fit"):
        linear_partials(x[:, :1000], w[:, :1000], tiles)


def test_gate_up_tma_equals_pointer_loads() -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(100, 1024, device="cuda", generator=gen).bfloat16()
    gate_up = (torch.randn(4096, 1024, device="cuda", generator=gen) * 1024**-0.5).bfloat16()
    pointer = gate_up_silu(x, gate_up, GemmTiles())
    tma = gate_up_silu(x, gate_up, GemmTiles(tma=True))
    assert pointer.shape == (100, 2048)
    assert rel_err(tma, pointer) < 1e-2  # the same products; only the accumulation order may differ


def test_add_partials_rmsnorm_matches_flashinfer() -> None:
    import flashinfer

    gen = torch.Generator(device="cuda").manual_seed(5)
    partials = torch.randn(2, 100, 1024, device="cuda", generator=gen)
    residual = torch.randn(100, 1024, device="cuda", generator=gen).bfloat16()
    weight = (torch.rand(1024, device="cuda", generator=gen) + 0.5).bfloat16()
    ours_residual = residual.clone()
    out = add_partials_rmsnorm(partials, ours_residual, weight, 1e-5)
    h = partials.sum(0).bfloat16()
    flashinfer.fused_add_rmsnorm(h, residual, weight, 1e-5)
    assert rel_err(ours_residual, residual) < 1e-2
    assert rel_err(out, h) < 1e-2
    with pytest.raises(ValueError, match="do not fit"):
        add_partials_rmsnorm(partials, residual[:50], weight, 1e-5)


def test_applies_only_to_short_steps() -> None:
    x = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    assert not fused_mlp_applies(64, 4096, 14336, x)  # few rows: cuBLAS's small-M kernels
    assert not fused_mlp_applies(129, 4096, 14336, x)
    assert not fused_mlp_applies(100, 576, 1536, x)  # SmolLM2: not a power-of-two hidden size
    assert not fused_mlp_applies(100, 4096, 14336, x.float())


@pytest.fixture(scope="module")
def fused_forward(model_dir: Path):
    from computeworker.model.llama_cuda import LlamaCudaForward
    from computeworker.model.loader import load_model

    model, spec = load_model(model_dir, dtype=torch.bfloat16, device="cuda", progress=False)
    attn = FlashInferAttention(
        AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim, 16), device="cuda"
    )
    attn.warmup()
    return LlamaCudaForward(model), spec, attn


def test_fused_forward_matches_transformers_and_unfused(model_dir: Path, fused_forward) -> None:
    from transformers import LlamaForCausalLM

    forward, spec, attn = fused_forward
    assert forward.fused_mlp
    tokens = prompt(100, seed=4)
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cuda").eval()
    with torch.no_grad():
        expected = reference(torch.tensor([tokens], device="cuda")).logits[0]

    def run(fused: bool, all_logits: bool) -> torch.Tensor:
        forward.fused_mlp = fused
        try:
            batch = build_forward_batch([SeqChunk(tokens, 0, list(range(7)))], 16, "cuda")
            return forward(batch, new_pool(spec), attn, all_logits)
        finally:
            forward.fused_mlp = True

    fused_all = run(True, True)
    assert fused_all.shape == (100, 1000)
    assert rel_err(fused_all, expected) < BF16_LOGITS_REL_TOL
    assert rel_err(fused_all, expected) <= rel_err(run(False, True), expected) * 1.2
    last = run(True, False)
    assert last.shape == (1, 1000)
    assert rel_err(last[0], fused_all[-1]) < 1e-3
    assert rel_err(last[0], run(False, False)[0]) < 2e-2
