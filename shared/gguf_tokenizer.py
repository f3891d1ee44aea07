"""Build a `tokenizers.Tokenizer` from the vocabulary stored in a GGUF file's metadata.

Two vocab kinds (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE (SmolLM2, Llama 3, Qwen2). Vocab + merges come straight from the file; the
  pre-tokenizer split rules are chosen by `tokenizer.ggml.pre`, as llama.cpp does.
- "llama": SentencePiece BPE (Llama 2, Mistral v0.1) with byte fallback. GGUF stores pieces and scores but
  no merges, so merges are rebuilt: every split of a piece into two in-vocab pieces is a merge, ranked by
  the merged piece's score (SentencePiece merges the highest-scoring pair first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from shared.gguf_file import GGUFFile
from shared.model_spec import GGUFMetadata

# llama.cpp token types
_CONTROL = 3
_USER_DEFINED = 4

# Split rules of the byte-level vocabularies, by `tokenizer.ggml.pre` (regexes as published with each model)
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True, slots=True)
class GGUFVocab:
    backend: Backend
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: tuple[int, ...]


def load_gguf_vocab(path: Path) -> GGUFVocab:
    """Read the tokenizer from a GGUF file's metadata (no tensor data is read). Raises ValueError for an
    unsupported vocabulary kind or pre-tokenizer."""
    with GGUFFile(path) as gguf_file:
        meta = GGUFMetadata(gguf_file.fields)
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    bos_id = meta.get("tokenizer.ggml.bos_token_id", None)
    eos_id = meta.get("tokenizer.ggml.eos_token_id", None)
    if kind == "gpt2":
        backend = _byte_level_bpe(
            tokens, meta.get("tokenizer.ggml.merges"), meta.get("tokenizer.ggml.pre", "default")
        )
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        scores: list[float] = meta.get("tokenizer.ggml.scores")
        unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
        backend = _sentencepiece_bpe(
            tokens, scores, unk_id, bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        )
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    else:
        raise ValueError(f"{path}: unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    )
    backend.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == _USER_DEFINED
        ]
    )
    bos = tokens[int(bos_id)] if bos_id is not None else None
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
        )
    eos_ids = tuple(
        dict.fromkeys(
            int(t) for t in (eos_id, meta.get("tokenizer.ggml.eot_token_id", None)) if t is not None
        )
    )
    return GGUFVocab(
        backend=backend,
        chat_template=meta.get("tokenizer.chat_template", None),
        bos_token=bos,
        eos_token=tokens[int(eos_id)] if eos_id is not None else None,
        eos_token_ids=eos_ids,
    )


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> Backend:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level
    if pre == "smollm":
        # SmolLM's own tokenizer (and llama.cpp's "smollm" rules) put every digit in its own token
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre!r} (supported: gpt2, smollm, llama-bpe, qwen2)"
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float], unk_id: int, add_space_prefix: bool
) -> Backend:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked: list[tuple[float, int, str, str]] = []
    for merged, merged_id in vocab.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[merged_id], merged_id, left, right))
    ranked.sort()
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=[(left, right) for _, _, left, right in ranked],
            unk_token=tokens[unk_id],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    steps = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode_steps)
    return backend
