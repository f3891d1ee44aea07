"""load_model_spec on Hugging Face directories (transformers 5 and 4.x config styles) and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.model_spec import RopeScaling, load_model_spec, spec_from_hf_config


def test_tiny_llama_dir(tiny_llama_dir: Path) -> None:
    spec = load_model_spec(tiny_llama_dir)
    assert (spec.architecture, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        "llama",
        2,
        4,
        2,
        16,
    )
    assert spec.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert (spec.qkv_bias, spec.o_bias, spec.tie_word_embeddings) == (False, False, False)
    assert (spec.bos_token_id, spec.eos_token_ids, spec.max_position_embeddings) == (1, (2,), 512)
    assert spec.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


def test_tiny_qwen2_dir(tiny_qwen2_dir: Path) -> None:
    spec = load_model_spec(tiny_qwen2_dir)
    assert (spec.architecture, spec.qkv_bias, spec.o_bias, spec.tie_word_embeddings) == (
        "qwen2",
        True,
        False,
        True,
    )
    assert (spec.rope_theta, spec.rope_scaling, spec.eos_token_ids) == (1000000.0, None, (3,))


def test_legacy_config_keys_and_generation_eos(tmp_path: Path) -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    spec = load_model_spec(tmp_path)
    assert (spec.head_dim, spec.rope_theta, spec.eos_token_ids) == (128, 500000.0, (128001, 128008, 128009))
    assert spec.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "unsupported architecture 'gpt2'"),
        ({"num_key_value_heads": 3}, "num_heads 4 is not a multiple of num_kv_heads 3"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling 'yarn'"),
    ],
)
def test_bad_configs_raise_value_error(change: dict, message: str) -> None:
    base = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 256,
    }
    with pytest.raises(ValueError, match=message):
        spec_from_hf_config({**base, **change}, "x")


def test_unrecognized_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not a model directory or a \.gguf file"):
        load_model_spec(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"found 0 \.gguf files"):
        load_model_spec(tmp_path)
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model_spec(tmp_path / "bad.gguf")
