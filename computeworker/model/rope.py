"""Rotary position embeddings at absolute positions (the positions of a batch's new tokens), in the
"rotate half" layout Hugging Face Llama/Qwen2 weights use (GGUF weights are converted to it on load).

Frequencies follow the model's scaling: none, linear (positions / factor), llama3 (long wavelengths
divided by the factor, short ones kept, a smooth blend in between), or explicit per-frequency divisors
(llama.cpp's `rope_freqs` tensor, how GGUF files carry Llama 3.1 scaling).
"""

from __future__ import annotations

import math

import torch

from shared.model_spec import RopeScaling


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None, freq_divisors: torch.Tensor | None = None
) -> torch.Tensor:
    """[head_dim // 2] float32 angular frequencies (radians per position)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if freq_divisors is not None:
        if freq_divisors.shape != inv_freq.shape:
            raise ValueError(
                f"rope_freqs has shape {tuple(freq_divisors.shape)}, expected {tuple(inv_freq.shape)}"
            )
        return inv_freq / freq_divisors.to(torch.float32).cpu()
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    return _llama3(inv_freq, scaling)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding:
    """Holds the frequencies on the compute device; stateless per call."""

    def __init__(self, inv_freq: torch.Tensor, device: torch.device) -> None:
        self._inv_freq = inv_freq.to(device=device, dtype=torch.float32)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each position: two [T, head_dim] tensors in `dtype` (computed in fp32)."""
        freqs = positions.to(torch.float32)[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by the per-token angles (cos/sin [T, head_dim])."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
