"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) that reads and writes K/V in the paged pool.

Per layer: RMSNorm -> fused q/k/v projection (+bias for Qwen2) -> RoPE at absolute positions -> paged
attention through the backend (which writes the new K/V first) -> output projection -> residual ->
RMSNorm -> SwiGLU MLP (fused gate/up) -> residual. GQA: k/v have num_kv_heads heads.

Weights are stored fused (q|k|v rows in one matrix, gate|up in another) so each layer does 4 matmuls;
`load_weight` takes checkpoint tensors under their Hugging Face names and copies them into the right rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from computeworker.model.batch import AttentionBackend, ForwardBatch
from computeworker.model.rope import RotaryEmbedding, apply_rotary, inverse_frequencies
from shared.model_spec import ModelSpec


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class LlamaLayer(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.q_size = spec.num_heads * d
        self.kv_size = spec.num_kv_heads * d
        qkv_rows = self.q_size + 2 * self.kv_size
        self.input_norm = _empty((h,), dtype, device)
        self.qkv_weight = _empty((qkv_rows, h), dtype, device)
        self.qkv_bias = _empty((qkv_rows,), dtype, device) if spec.qkv_bias else None
        self.o_weight = _empty((h, self.q_size), dtype, device)
        self.o_bias = _empty((h,), dtype, device) if spec.o_bias else None
        self.post_norm = _empty((h,), dtype, device)
        self.gate_up_weight = _empty((2 * spec.intermediate_size, h), dtype, device)
        self.down_weight = _empty((h, spec.intermediate_size), dtype, device)

    def weight_slots(self, intermediate: int) -> dict[str, tuple[nn.Parameter, int, int]]:
        """HF suffix -> (destination, first row, end row)."""
        q, kv = self.q_size, self.kv_size
        slots: dict[str, tuple[nn.Parameter, int, int]] = {
            "input_layernorm.weight": (self.input_norm, 0, self.input_norm.shape[0]),
            "self_attn.q_proj.weight": (self.qkv_weight, 0, q),
            "self_attn.k_proj.weight": (self.qkv_weight, q, q + kv),
            "self_attn.v_proj.weight": (self.qkv_weight, q + kv, q + 2 * kv),
            "self_attn.o_proj.weight": (self.o_weight, 0, self.o_weight.shape[0]),
            "post_attention_layernorm.weight": (self.post_norm, 0, self.post_norm.shape[0]),
            "mlp.gate_proj.weight": (self.gate_up_weight, 0, intermediate),
            "mlp.up_proj.weight": (self.gate_up_weight, intermediate, 2 * intermediate),
            "mlp.down_proj.weight": (self.down_weight, 0, self.down_weight.shape[0]),
        }
        if self.qkv_bias is not None:
            slots["self_attn.q_proj.bias"] = (self.qkv_bias, 0, q)
            slots["self_attn.k_proj.bias"] = (self.qkv_bias, q, q + kv)
            slots["self_attn.v_proj.bias"] = (self.qkv_bias, q + kv, q + 2 * kv)
        if self.o_bias is not None:
            slots["self_attn.o_proj.bias"] = (self.o_bias, 0, self.o_bias.shape[0])
        return slots


class LlamaModel(nn.Module):
    """Inference-only decoder over the paged KV pool. Parameters start uninitialized: fill every one with
    `load_weight`, then call `finish_loading` (which raises if any is missing)."""

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        h = spec.hidden_size
        self.embed = _empty((spec.vocab_size, h), dtype, self.device)
        self.layers = nn.ModuleList(LlamaLayer(spec, dtype, self.device) for _ in range(spec.num_layers))
        self.final_norm = _empty((h,), dtype, self.device)
        self.lm_head = (
            self.embed if spec.tie_word_embeddings else _empty((spec.vocab_size, h), dtype, self.device)
        )
        self.rope = RotaryEmbedding(
            inverse_frequencies(spec.head_dim, spec.rope_theta, spec.rope_scaling), self.device
        )
        self._slots = self._build_slots()
        self._pending = set(self._slots)

    def _build_slots(self) -> dict[str, tuple[nn.Parameter, int, int]]:
        slots = {
            "model.embed_tokens.weight": (self.embed, 0, self.spec.vocab_size),
            "model.norm.weight": (self.final_norm, 0, self.spec.hidden_size),
        }
        if not self.spec.tie_word_embeddings:
            slots["lm_head.weight"] = (self.lm_head, 0, self.spec.vocab_size)
        for i, layer in enumerate(self.layers):
            for suffix, slot in layer.weight_slots(self.spec.intermediate_size).items():
                slots[f"model.layers.{i}.{suffix}"] = slot
        return slots

    # ---- loading ---------------------------------------------------------------------------------------

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (Hugging Face name) into place, converting dtype and device.
        A tied model ignores `lm_head.weight`. Raises ValueError for an unknown name or a shape mismatch."""
        if name == "lm_head.weight" and self.spec.tie_word_embeddings:
            return
        if name not in self._slots:
            raise ValueError(f"unexpected weight {name!r}")
        param, start, end = self._slots[name]
        expected = (end - start, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {expected}")
        with torch.no_grad():
            param[start:end].copy_(tensor)
        self._pending.discard(name)

    def set_rope_freq_divisors(self, divisors: torch.Tensor) -> None:
        """Use explicit per-frequency divisors (GGUF `rope_freqs`) instead of the spec's scaling."""
        spec = self.spec
        self.rope = RotaryEmbedding(
            inverse_frequencies(spec.head_dim, spec.rope_theta, None, divisors), self.device
        )

    def finish_loading(self) -> None:
        """Raise ValueError naming the weights never loaded."""
        if self._pending:
            missing = sorted(self._pending)
            raise ValueError(f"{len(missing)} weights missing, e.g. {missing[:5]}")

    # ---- forward ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        kv_pool: torch.Tensor,
        attention: AttentionBackend,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run the new tokens of `batch`, writing their K/V into `kv_pool` ([layers, pages, 2, page_size,
        kv_heads, head_dim]) at the batch's write slots. Calls `attention.begin(batch)` first.

        Returns float32 logits: [num_seqs, vocab] for each sequence's last new token, or [num_tokens,
        vocab] for every new token if `all_logits`. Must hold: the pages in the batch cover each
        sequence's kv_len, and the cached positions' K/V are already in them."""
        spec = self.spec
        attention.begin(batch)
        x = F.embedding(batch.input_ids, self.embed)
        cos, sin = self.rope.cos_sin(batch.positions, x.dtype)
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (spec.hidden_size,), layer.input_norm, spec.rms_norm_eps)
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)
            q, k, v = qkv.split((layer.q_size, layer.kv_size, layer.kv_size), dim=-1)
            q = apply_rotary(q.view(-1, spec.num_heads, spec.head_dim), cos, sin)
            k = apply_rotary(k.view(-1, spec.num_kv_heads, spec.head_dim), cos, sin)
            v = v.reshape(-1, spec.num_kv_heads, spec.head_dim)
            o = attention.forward(i, q, k, v, kv_pool[i])
            x = x + F.linear(o.reshape(-1, layer.q_size), layer.o_weight, layer.o_bias)
            h = F.rms_norm(x, (spec.hidden_size,), layer.post_norm, spec.rms_norm_eps)
            gate, up = F.linear(h, layer.gate_up_weight).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down_weight)
        if not all_logits:
            x = x.index_select(0, (batch.qo_indptr[1:] - 1).to(torch.long))
        x = F.rms_norm(x, (spec.hidden_size,), self.final_norm, spec.rms_norm_eps)
        return F.linear(x, self.lm_head).float()
