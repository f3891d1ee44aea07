"""Load a LlamaModel from a Hugging Face directory (safetensors, sharded or not) or a GGUF file.

Tensors stream one at a time into the model's preallocated parameters (converted to the compute dtype on
the way), so peak memory is the model plus one tensor. A progress bar goes to stderr.

GGUF specifics: quantized tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized with gguf's own
`quants.dequantize`; llama.cpp stores Llama/Mistral q and k projections with the rows of each head
interleaved for its RoPE kernel, which `_unpermute` undoes so the usual rotate-half RoPE applies.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from computeworker.model.llama import LlamaModel
from shared.gguf_file import GGUFFile
from shared.model_spec import ModelSpec, load_model_spec, resolve_gguf_file

_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    progress: bool = True,
) -> tuple[LlamaModel, ModelSpec]:
    """Build the model described at `path` and load its weights. Raises ValueError for an unsupported or
    incomplete checkpoint."""
    p = Path(path)
    spec = load_model_spec(p)
    model = LlamaModel(spec, dtype=dtype, device=device)
    if p.is_dir() and (p / "config.json").is_file():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{p}: no .safetensors files")
        _load_safetensors(model, files, progress)
    else:
        _load_gguf(model, resolve_gguf_file(p), progress)
    model.finish_loading()
    model.eval()
    return model, spec


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not progress, leave=False)


def _load_safetensors(model: LlamaModel, files: list[Path], progress: bool) -> None:
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt") for f in files]
    total = sum(len(list(h.keys())) for h in handles)
    with _bar(total, f"loading {model.spec.name}", progress) as bar:
        for handle in handles:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if not name.endswith("rotary_emb.inv_freq"):  # old checkpoints store the RoPE buffer
                    model.load_weight(name, handle.get_tensor(name))
                bar.update()


def _load_gguf(model: LlamaModel, path: Path, progress: bool) -> None:
    spec = model.spec
    permuted = spec.architecture in ("llama", "mistral")  # llama.cpp permutes q/k only for these
    with GGUFFile(path) as gguf_file, _bar(len(gguf_file.tensors), f"loading {path.name}", progress) as bar:
        for t in gguf_file.tensors:
            name = _hf_name(t.name)
            tensor = torch.from_numpy(gguf_file.tensor_data(t))
            if name == "rope_freqs.weight":
                model.set_rope_freq_divisors(tensor)
                bar.update()
                continue
            if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = _unpermute(tensor, spec.num_heads)
            elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = _unpermute(tensor, spec.num_kv_heads)
            model.load_weight(name, tensor)
            bar.update()


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_TOP:
        return _GGUF_TOP[gguf_name]
    if gguf_name == "rope_freqs.weight":
        return gguf_name
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's conversion permute: within each head, rows were reordered from
    [first half | second half] to interleaved pairs; put them back."""
    rows = w.shape[0]
    head_dim = rows // num_heads
    rest = w.shape[1:]
    return w.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)
