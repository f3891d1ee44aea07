"""SmolLM2 loaded once per session, by us and by transformers.

transformers' side goes through `load_gguf_checkpoint` once (its own GGUF parsing, dequantization and q/k
un-permutation, so the comparison checks ours independently), and its tokenizer is built from that same
parse with transformers' GGUF tokenizer converter: parsing the 49k-entry vocabulary with gguf's reader
costs seconds each time, and AutoConfig + AutoModel + AutoTokenizer would parse it three times.
(`from_pretrained(gguf_file=...)` also insists on `accelerate`, which serves only weight placement.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch


@dataclass(frozen=True)
class HFReference:
    model: torch.nn.Module
    tokenizer: Any
    config: dict[str, Any]  # transformers' reading of the GGUF metadata


@pytest.fixture(scope="session")
def smollm2_ours(smollm2_gguf: Path) -> torch.nn.Module:
    from computeworker.model.loader import load_model

    model, _ = load_model(smollm2_gguf, torch.float32, "cpu", progress=False)
    return model


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path) -> HFReference:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The architecture written out (transformers needs a model to map tensor names); the test checks
    # these numbers against transformers' own reading of the file, returned below.
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=9.999999747378752e-06,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    loaded = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(loaded["tensors"], strict=False, assign=True)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers were on meta
    # What AutoTokenizer.from_pretrained(dir, gguf_file=...) does, minus its hub/file resolution
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(smollm2_gguf))
    fast, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=fast, **tokenizer_config, **extra)
    return HFReference(model.float().eval(), tokenizer, loaded["config"])
