"""The embedded SmolLM2-135M-Instruct GGUF: our model against transformers reading the same file. fp32."""

from __future__ import annotations

from pathlib import Path

import torch

from shared.model_spec import load_model_spec
from tests.model.conftest import HFReference
from tests.model.harness import check_against_reference, hf_logits


def test_spec_from_gguf_metadata_agrees_with_transformers(
    smollm2_gguf: Path, smollm2_hf: HFReference
) -> None:
    spec = load_model_spec(smollm2_gguf)
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.intermediate_size) == (
        "llama",
        30,
        576,
        1536,
    )
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (9, 3, 64, 49152)
    assert (spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings) == (100000.0, None, 8192)
    assert (spec.tie_word_embeddings, spec.qkv_bias, spec.bos_token_id, spec.eos_token_ids) == (
        True,
        False,
        1,
        (2,),
    )
    assert spec.rms_norm_eps == 9.999999747378752e-06
    hf = smollm2_hf.config
    assert (hf["num_hidden_layers"], hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]) == (
        30,
        576,
        1536,
        49152,
    )
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]) == (9, 3, 64)
    assert (hf["rope_theta"], hf["rms_norm_eps"], hf["tie_word_embeddings"]) == (
        100000.0,
        spec.rms_norm_eps,
        True,
    )


def test_logits_match_transformers(smollm2_ours: torch.nn.Module, smollm2_hf: HFReference) -> None:
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = smollm2_hf.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    # Extend with the model's own greedy continuation so the decode steps see realistic tokens
    tokens = list(prompt)
    for _ in range(3):
        tokens.append(int(hf_logits(smollm2_hf.model, tokens)[-1].argmax()))
    ref = hf_logits(smollm2_hf.model, tokens)
    assert smollm2_hf.tokenizer.decode(tokens[len(prompt) :]) == "The capital of"
    check_against_reference(smollm2_ours, ref, tokens, prefill_len=len(prompt), split=16)
