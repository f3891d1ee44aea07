"""The Llama forward pass on CUDA with FlashInfer's fused kernels: the same function as
`LlamaModel.forward` (computeworker/model/llama.py), with fewer passes over memory and fewer launches.

Per layer, torch's path runs ~25 kernels (RMSNorm, rotate-half RoPE as cat/neg/mul/add on q and on k,
SiLU then mul, separate residual adds); this one runs ~10::

    fused_add_rmsnorm(h, residual)   residual += h; h = rmsnorm(residual)   (one kernel, in place)
    qkv = h @ Wqkv
    rope(q, k) in place               cos/sin from a per-position fp32 table, no temporaries
    attention(q, k, v)                the backend writes k/v into the pool first
                                      (in CUDA graphs: RoPE and the K/V write are one kernel, rope_store)
    h = o @ Wo
    fused_add_rmsnorm(h, residual)
    h = silu_and_mul(h @ Wgate_up) @ Wdown

(Steps of 65-128 rows on Hopper run the MLP as three Triton kernels instead: gate_up with SiLU-and-mul in
its epilogue, down as split-K partial sums, their reduction folded into the next add + RMSNorm; see
computeworker/model/fused_mlp.py.)

The residual stream is carried separately and added lazily by the next fused_add_rmsnorm, so no layer
pays a separate add. Used only for CUDA models in float16/bfloat16 (FlashInfer's kernels); CPU and
float32 keep the torch path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from computeworker.model.batch import AttentionBackend, ForwardBatch
from computeworker.model.fused_mlp import (
    TILES,
    add_partials_rmsnorm,
    fused_mlp_applies,
    fused_mlp_enabled,
    mlp_partials,
)

if TYPE_CHECKING:
    from computeworker.model.llama import LlamaModel

_MIN_ROPE_POSITIONS = 4096


def fused_path_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """True where this forward runs: a CUDA device, float16/bfloat16, and FlashInfer importable."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    import importlib.util

    return importlib.util.find_spec("flashinfer") is not None


class LlamaCudaForward:
    """Runs `model`'s forward with fused kernels. State: the RoPE cos/sin table (fp32, grown on demand to
    cover the largest position seen; rebuilt if the model's rotary embedding object is replaced)."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self._rope_source: object | None = None
        self._cos_sin = torch.empty(0, model.spec.head_dim, dtype=torch.float32, device=model.device)
        # Steps of 65-128 rows run the MLP as computeworker/model/fused_mlp.py's three kernels (which need
        # packed weights: checked once, on the first step that could use them).
        self.fused_mlp = fused_mlp_enabled()
        self._mlp_weights_packed: bool | None = None
        self.tiles = TILES  # the fused MLP's launches (benchmarks swap them)

    def reserve_positions(self, num_positions: int) -> None:
        """Build the cos/sin table for positions [0, num_positions) now. A CUDA graph captured after
        this keeps pointing at the same table: it is never reallocated for positions below that."""
        self._cos_sin_table(num_positions)

    def _cos_sin_table(self, max_position: int) -> torch.Tensor:
        """[n, head_dim] float32: cos of each frequency in the first half, sin in the second."""
        rope = self.model.rope
        if rope is not self._rope_source or self._cos_sin.shape[0] <= max_position:
            n = max(_MIN_ROPE_POSITIONS, 1 << max_position.bit_length(), self._cos_sin.shape[0])
            positions = torch.arange(n, device=self.model.device)
            cos, sin = rope.cos_sin(positions, torch.float32)  # each [n, head_dim], halves repeated
            half = self.model.spec.head_dim // 2
            self._cos_sin = torch.cat((cos[:, :half], sin[:, :half]), dim=-1).contiguous()
            self._rope_source = rope
        return self._cos_sin

    @torch.inference_mode()
    def __call__(
        self, batch: ForwardBatch, kv_pool: torch.Tensor, attention: AttentionBackend, all_logits: bool
    ) -> torch.Tensor:
        """Same contract as LlamaModel.forward."""
        import flashinfer

        model, spec = self.model, self.model.spec
        eps = spec.rms_norm_eps
        d = spec.head_dim
        cos_sin = self._cos_sin_table(max(batch.kv_lens))
        attention.begin(batch)
        fused_rope = getattr(attention, "fuses_rope", False)
        residual = F.embedding(batch.input_ids, model.embed)
        fuse_mlp = (
            self.fused_mlp
            and fused_mlp_applies(
                residual.shape[0], spec.hidden_size, spec.intermediate_size, residual, self.tiles
            )
            and self._mlp_weights_are_packed()
        )
        partials: torch.Tensor | None = None  # the last MLP's unreduced output, when fused
        h = flashinfer.rmsnorm(residual, model.layers[0].input_norm, eps)
        for i, layer in enumerate(model.layers):
            if partials is not None:
                h = add_partials_rmsnorm(partials, residual, layer.input_norm, eps)
            elif i > 0:
                flashinfer.fused_add_rmsnorm(h, residual, layer.input_norm, eps)
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)
            q, k, v = qkv.split((layer.q_size, layer.kv_size, layer.kv_size), dim=-1)
            heads = (
                q.view(-1, spec.num_heads, d),
                k.view(-1, spec.num_kv_heads, d),
                v.view(-1, spec.num_kv_heads, d),
            )
            if fused_rope:  # the graphs' backend rotates q / k and writes K / V in one kernel
                o = attention.forward_with_rope(i, *heads, kv_pool[i], batch.positions, cos_sin)  # type: ignore[attr-defined]
            else:
                flashinfer.apply_rope_with_cos_sin_cache_inplace(
                    batch.positions, q, k, d, cos_sin, is_neox=True
                )
                o = attention.forward(i, *heads, kv_pool[i])
            h = F.linear(o.reshape(-1, layer.q_size), layer.o_weight, layer.o_bias)
            flashinfer.fused_add_rmsnorm(h, residual, layer.post_norm, eps)
            if fuse_mlp:
                partials = mlp_partials(h, layer.gate_up_weight, layer.down_weight, self.tiles)
            else:
                h = F.linear(flashinfer.silu_and_mul(F.linear(h, layer.gate_up_weight)), layer.down_weight)
        last_rows = None if all_logits else (batch.qo_indptr[1:] - 1).to(torch.long)
        if partials is not None:  # RMSNorm is per row: normalise every row, then keep the last ones
            x = add_partials_rmsnorm(partials, residual, model.final_norm, eps)
            if last_rows is not None:
                x = x.index_select(0, last_rows)
        else:
            residual += h
            if last_rows is not None:
                residual = residual.index_select(0, last_rows)
            x = flashinfer.rmsnorm(residual, model.final_norm, eps)
        return F.linear(x, model.lm_head).float()

    def _mlp_weights_are_packed(self) -> bool:
        if self._mlp_weights_packed is None:
            self._mlp_weights_packed = all(
                layer.gate_up_weight.is_contiguous() and layer.down_weight.is_contiguous()
                for layer in self.model.layers
            )
        return self._mlp_weights_packed
