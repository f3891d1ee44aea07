"""Our GGUF tokenizer and chat template against transformers' reading of the same file; the HF-directory
path against transformers' own save; streaming detokenization over multi-byte characters."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.tokenizer import Tokenizer, load_tokenizer
from tests.model.conftest import HFReference

TEXTS = [
    "Hello world, héllo 日本語 🙂  \n\n  x",
    "  leading spaces\tand\ttabs\r\n trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "don't I'll we've THEY'RE",
    "émoji 👩‍👩‍👧 combos and ümlauts: Größe, naïve, façade",
    "numbers 1234567 3.14159 -42 1e-5 0x1F",
    "def f(x):\n    return x ** 2  # comment\n",
    "Ġ literal byte-level chars Ċ ĉ",
    "",
    " ",
    "a" * 60,
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Summarize: «日本語» 🙂"},
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours: Tokenizer, smollm2_hf: HFReference, text: str) -> None:
    ids = ours.encode(text)
    assert ids == smollm2_hf.tokenizer.encode(text)
    assert ours.decode_with_special(ids) == text
    assert ours.decode(ids) == smollm2_hf.tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_and_eos(ours: Tokenizer) -> None:
    assert (ours.bos_token, ours.bos_token_id, ours.eos_token, ours.eos_token_ids) == (
        "<|im_start|>",
        1,
        "<|im_end|>",
        (2,),
    )
    assert ours.encode("<|im_end|>") == [2]
    assert ours.decode([1, 19556, 2]) == "Hello"


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:2], CONVERSATION[:3]])
def test_chat_template_matches_transformers(ours: Tokenizer, smollm2_hf: HFReference, messages: list) -> None:
    for add_generation_prompt in (True, False):
        expected = smollm2_hf.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.apply_chat_template(messages, add_generation_prompt) == expected
        assert ours.encode_chat(messages, add_generation_prompt) == smollm2_hf.tokenizer.encode(expected)


def test_default_system_prompt_is_the_templates(ours: Tokenizer) -> None:
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_hf_directory_matches_gguf(ours: Tokenizer, smollm2_hf: HFReference, tmp_path: Path) -> None:
    smollm2_hf.tokenizer.save_pretrained(tmp_path)
    from_dir = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert from_dir.encode(text) == ours.encode(text)
    assert from_dir.apply_chat_template(CONVERSATION) == ours.apply_chat_template(CONVERSATION)
    assert (from_dir.eos_token_ids, from_dir.bos_token_id) == ((2,), 1)


def test_streaming_detokenizer_holds_back_partial_characters(ours: Tokenizer) -> None:
    text = "Größe 日本語 and 👩‍👩‍👧 done."
    ids = ours.encode(text)
    detok = ours.detokenizer(ours.encode("Prompt:"))
    pieces = [detok.add([i]) for i in ids]
    pieces.append(detok.finish())
    assert "".join(pieces) == text == detok.text
    assert all("\ufffd" not in p for p in pieces)
    # 日 is split over byte-level tokens: the tokens before the last of its bytes emit nothing
    assert pieces.count("") >= 1


def test_detokenizer_flushes_an_incomplete_character_at_finish(ours: Tokenizer) -> None:
    first_byte_of_emoji = ours.encode("🙂")[0]
    detok = ours.detokenizer()
    assert detok.add(ours.encode("ok ")) == "ok "
    assert detok.add([first_byte_of_emoji]) == ""
    assert detok.finish() == "\ufffd"


def test_chat_template_misuse_raises_value_error(ours: Tokenizer) -> None:
    with pytest.raises(ValueError, match="message 0 must be a mapping with a 'role'"):
        ours.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="chat template failed"):
        ours.apply_chat_template([{"role": "user"}])  # the template concatenates a missing content
