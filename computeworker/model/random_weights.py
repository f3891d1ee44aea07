"""A LlamaModel with random weights, for benchmarks and GPU tests of a shape whose weights we do not have
(e.g. Llama-3-8B on a machine without network access).

The model directory only needs `config.json` (the shape); nothing else is read here. Weights are drawn on
the target device from a seeded generator, in a fixed order, so two workers started with the same seed
on the same kind of device hold bit-identical weights (the daemon may send a prefix computed by one to
the other). Matrices ~ N(0, std^2), norm weights 1, biases 0: the initialisation Hugging Face uses, which
keeps activations and logits in a normal range through many layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from computeworker.model.llama import LlamaModel
from shared.model_spec import ModelSpec, load_model_spec

DEFAULT_STD = 0.02


def random_model(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    seed: int = 0,
    std: float = DEFAULT_STD,
) -> tuple[LlamaModel, ModelSpec]:
    """Build the model `path/config.json` describes with seeded random weights. Raises ValueError for an
    unsupported config or a non-positive std."""
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    spec = load_model_spec(path)
    model = LlamaModel(spec, dtype=dtype, device=device)
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for name, shape in _weight_shapes(model):
        model.load_weight(name, _draw(name, shape, std, dtype, device, generator))
    model.finish_loading()
    model.eval()
    return model, spec


def _weight_shapes(model: LlamaModel) -> list[tuple[str, tuple[int, ...]]]:
    """Every checkpoint name the model expects with its shape, in a fixed order."""
    spec = model.spec
    h = spec.hidden_size
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab_size, h))]
    for i, layer in enumerate(model.layers):
        for suffix, (param, start, end) in layer.weight_slots(spec.intermediate_size).items():
            names.append((f"model.layers.{i}.{suffix}", (end - start, *param.shape[1:])))
    names.append(("model.norm.weight", (h,)))
    if not spec.tie_word_embeddings:
        names.append(("lm_head.weight", (spec.vocab_size, h)))
    return names


def _draw(
    name: str,
    shape: tuple[int, ...],
    std: float,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype, device=device)
    out.normal_(0.0, std, generator=generator)
    return out
