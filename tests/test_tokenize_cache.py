"""shared.tokenize_cache: piece-wise tokenization between special tokens equals whole-text tokenization
(SmolLM2's GGUF tokenizer, HF tokenizer.json files with a normalizer, Metaspace and a BOS template),
tokenizers where that cannot be proven are refused, and the LRU stays within its byte bound."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from shared.tokenize_cache import CHUNK_CHARS, ENTRY_OVERHEAD_BYTES, SegmentEncoder, encode_ids
from shared.tokenizer import Tokenizer as OurTokenizer
from shared.tokenizer import load_tokenizer

SMOL_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>"]
HF_SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
HF_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Ünïcödé \ufb01 ligatures and \uff26\uff35\uff2c\uff2c width.",
    "Refunds are processed within 14 days; shipping to 日本 costs more. 🙂 emoji too.",
    "def f(x):\n    return x * 2  # tabs\tand spaces",
] * 20

# Text pieces: ASCII, whitespace runs, compatibility characters (NFKC changes them), CJK, emoji (ZWJ),
# digits, and fragments of special tokens that must not be mistaken for them.
_ALPHABET = st.sampled_from(
    [
        *"abc xyz\n\t ",
        "  ",
        "\r\n",
        "é",
        "\ufb01",
        "\uff26",
        "日本",
        "🙂",
        "👩\u200d👧",
        "12",
        "3.5",
        "<",
        "|>",
        "<|im",
        "</",
    ]
)


def _texts(specials: list[str]) -> st.SearchStrategy[str]:
    chunk = st.lists(_ALPHABET, max_size=12).map("".join)
    return st.lists(st.one_of(chunk, st.sampled_from(specials)), max_size=8).map("".join)


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> OurTokenizer:
    return load_tokenizer(smollm2_gguf)


def _hf_dir(path: Path, *, prepend_scheme: str = "always", lstrip_token: bool = False) -> Path:
    """A trained BPE tokenizer.json: NFKC, Metaspace, BOS via TemplateProcessing, chat specials."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("\t", "    ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    tok.decoder = decoders.Metaspace(prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *HF_SPECIALS], show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    if lstrip_token:
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": HF_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> OurTokenizer:
    return load_tokenizer(_hf_dir(tmp_path_factory.mktemp("hf_bpe")))


@pytest.fixture(scope="module")
def smol_encoder(smol: OurTokenizer) -> SegmentEncoder:
    return _encoder(smol)


@pytest.fixture(scope="module")
def hf_encoder(hf: OurTokenizer) -> SegmentEncoder:
    return _encoder(hf)


def _encoder(tokenizer: OurTokenizer, max_bytes: int = 1 << 20) -> SegmentEncoder:
    encoder, why = SegmentEncoder.create(tokenizer._backend, max_bytes, min_cached_chars=0)
    assert why == ""
    assert encoder is not None
    return encoder


def _check_text(tokenizer: OurTokenizer, encoder: SegmentEncoder, text: str) -> None:
    backend = tokenizer._backend
    for add_special in (True, False):
        whole = backend.encode(text, add_special_tokens=add_special).ids
        assert encode_ids(backend, text, add_special_tokens=add_special) == whole
        assert encoder.encode(text, add_special_tokens=add_special).tolist() == whole  # cold pieces
        assert encoder.encode(text, add_special_tokens=add_special).tolist() == whole  # cached pieces


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_texts(SMOL_SPECIALS))
def test_smollm2_gguf_piecewise_equals_whole(
    smol: OurTokenizer, smol_encoder: SegmentEncoder, text: str
) -> None:
    _check_text(smol, smol_encoder, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_texts(HF_SPECIALS))
def test_hf_tokenizer_json_piecewise_equals_whole(
    hf: OurTokenizer, hf_encoder: SegmentEncoder, text: str
) -> None:
    _check_text(hf, hf_encoder, text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    contents=st.lists(_texts([*SMOL_SPECIALS, "<|im_start|>assistant\n"]), min_size=1, max_size=4),
    system=st.booleans(),
)
def test_chat_templates_piecewise_equal_whole(
    smol: OurTokenizer,
    hf: OurTokenizer,
    smol_encoder: SegmentEncoder,
    hf_encoder: SegmentEncoder,
    contents: list[str],
    system: bool,
) -> None:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]
    if system:
        messages.insert(0, {"role": "system", "content": "You are terse. " * 20})
    for tokenizer, encoder in ((smol, smol_encoder), (hf, hf_encoder)):
        text = tokenizer.apply_chat_template(messages)
        for _ in range(2):
            assert encoder.encode(text, add_special_tokens=False).tolist() == tokenizer.encode_chat(messages)


def test_hf_bos_wrap_and_empty_text(hf: OurTokenizer) -> None:
    encoder = _encoder(hf)
    assert encoder.encode("", add_special_tokens=True).tolist() == [1]
    assert encoder.encode("", add_special_tokens=False).tolist() == []
    assert encoder.encode("<s></s>", add_special_tokens=True).tolist() == [1, 1, 2]
    assert hf.encode("hello") == encoder.encode("hello", add_special_tokens=True).tolist()


def test_unsafe_tokenizers_are_refused(tmp_path: Path) -> None:
    first = load_tokenizer(_hf_dir(tmp_path / "first", prepend_scheme="first"))
    encoder, why = first.segment_encoder(1 << 20)
    assert (encoder, why) == (None, "Metaspace prepend_scheme 'first' treats the first piece differently")
    # ...and rightly: with "first", a piece after a special token tokenizes differently on its own.
    backend = first._backend
    whole = backend.encode("<|user|>quick brown", add_special_tokens=False).ids
    alone = backend.encode("quick brown", add_special_tokens=False).ids
    assert whole[1:] != alone
    lstrip = load_tokenizer(_hf_dir(tmp_path / "lstrip", lstrip_token=True))
    assert lstrip.segment_encoder(1 << 20) == (
        None,
        "added token '<mask>' looks at its neighbours (lstrip/rstrip/single_word)",
    )
    dropout = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")], dropout=0.5))
    assert SegmentEncoder.create(dropout, 1 << 20) == (None, "BPE dropout makes tokenization random")
    truncating = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    truncating.enable_truncation(8)
    assert SegmentEncoder.create(truncating, 1 << 20) == (None, "truncation or padding is enabled")
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        SegmentEncoder.create(truncating, 0)


def test_lru_is_bounded_by_bytes_and_evicts_oldest(smol: OurTokenizer) -> None:
    pieces = ["alpha " * 20, "beta " * 30, "gamma " * 25]
    ids = [np.asarray(smol._backend.encode(p, add_special_tokens=False).ids, dtype=np.int32) for p in pieces]
    sizes = [len(p.encode()) + a.nbytes + ENTRY_OVERHEAD_BYTES for p, a in zip(pieces, ids, strict=True)]
    encoder, _ = SegmentEncoder.create(smol._backend, sizes[0] + sizes[1], min_cached_chars=64)
    assert encoder is not None
    text = "<|im_start|>" + pieces[0] + "<|im_end|>" + pieces[1] + "<|im_end|>"
    assert encoder.encode(text, add_special_tokens=False).tolist() == [1, *ids[0], 2, *ids[1], 2]
    stats = encoder.stats()
    assert (stats.num_entries, stats.num_bytes, stats.hits, stats.misses) == (2, sizes[0] + sizes[1], 0, 2)
    encoder.encode(pieces[0], add_special_tokens=False)  # a hit: piece 0 becomes the most recent
    encoder.encode(pieces[2], add_special_tokens=False)  # a miss: piece 1 (least recent) is evicted
    stats = encoder.stats()
    assert (stats.num_entries, stats.num_bytes, stats.hits, stats.misses) == (2, sizes[0] + sizes[2], 1, 3)
    encoder.encode(pieces[1] + "<|im_end|>", add_special_tokens=False)  # a miss again
    assert encoder.stats().misses == 4
    short = "<|im_start|>hi<|im_end|>"  # under min_cached_chars: tokenized, never cached
    assert encoder.encode(short, add_special_tokens=False).tolist() == [1, 6004, 2]
    assert encoder.stats().misses == 4


def test_piece_larger_than_the_bound_is_not_cached(smol: OurTokenizer) -> None:
    encoder, _ = SegmentEncoder.create(smol._backend, 1024, min_cached_chars=0)
    assert encoder is not None
    big = "word " * 400
    assert encoder.encode(big, add_special_tokens=False).tolist() == smol._backend.encode(big).ids
    assert (encoder.stats().num_entries, encoder.stats().num_bytes) == (0, 0)
    small = "small text " * 3
    first = encoder.encode(small, add_special_tokens=False)
    first[:] = 0  # a caller's copy: changing it must not change what the cache hands out next
    assert encoder.encode(small, add_special_tokens=False).tolist() == smol._backend.encode(small).ids
    assert (encoder.stats().num_entries, encoder.stats().hits) == (1, 1)


# ---------------------------------------------------------------- long pieces, cut into chunks

_WORDS = [
    "The", "cache,", "keeps", "pages.", '"quoted"', "42", "3.5", "items;", "émigré", "日本語", "it's", "(paren)",
    "Ωmega", "x1", "line\n", "two  spaces", "tab\there", "🙂", "end!", "<|im", "</s", "é",
]  # fmt: skip


def _document(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


@pytest.mark.parametrize("which", ["smol", "hf"])
def test_long_pieces_are_chunked_and_equal_whole_text(which: str, request: pytest.FixtureRequest) -> None:
    tokenizer: OurTokenizer = request.getfixturevalue(which)
    encoder = _encoder(tokenizer)
    assert encoder.chunk_chars == CHUNK_CHARS  # both pre-tokenizers cut words and pass the long probe
    rng = random.Random(3)
    for _ in range(4):
        _check_text(tokenizer, encoder, _document(rng, 3000))


def test_a_shared_long_prefix_reuses_its_chunks(smol: OurTokenizer) -> None:
    encoder = _encoder(smol, max_bytes=64 << 20)
    doc = _document(random.Random(5), 6000)  # ~40k characters: ~20 chunks
    backend = smol._backend
    first = encoder.encode(doc + " What does it say?", add_special_tokens=True)
    cold = encoder.stats()
    second = encoder.encode(doc + " And in one word?", add_special_tokens=True)
    warm = encoder.stats()
    assert first.tolist() == backend.encode(doc + " What does it say?").ids
    assert second.tolist() == backend.encode(doc + " And in one word?").ids
    assert cold.misses >= 15 and cold.hits == 0
    assert warm.hits - cold.hits == cold.misses - 1  # every chunk but the last, which holds the question
    assert warm.misses - cold.misses == 1


def test_chunking_stays_off_without_a_word_splitting_pre_tokenizer() -> None:
    """A bare BPE over whole pieces may merge across a space, so a cut could change the ids."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>"], show_progress=False)
    tok.train_from_iterator([" ".join(_WORDS)] * 50, trainer)  # merges learn " " inside tokens
    encoder, why = SegmentEncoder.create(tok, 1 << 20, min_cached_chars=0)
    assert why == "" and encoder is not None
    assert encoder.chunk_chars == 0
    text = _document(random.Random(1), 2000)
    assert (
        encoder.encode(text, add_special_tokens=False).tolist()
        == tok.encode(text, add_special_tokens=False).ids
    )
