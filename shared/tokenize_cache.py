"""Cache-aware, exact tokenization: text is cut at added (special) tokens and each piece between two of
them is tokenized once and remembered, so a repeated 10k-token system prompt costs a dictionary lookup.

Why this is exact: a Hugging Face tokenizer itself first splits the input on its non-normalized added
tokens (leftmost-longest match on the raw text), and then normalizes, pre-tokenizes and models every
remaining piece on its own; only the post-processor (BOS/EOS around the whole input), truncation and
padding see the whole input::

    text:    <|im_start|>system\\n{10k-token prompt}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>
    pieces:  [special] [------- piece A (cached) --------] [special] [\\n] [special] [-- piece B --] [special]
    ids:     post_process( id(special) + ids(A) + id(special) + ids(\\n) + ... )

So ids(whole) == wrap(concat(ids(piece) or id(special))) as long as nothing looks across a piece's edges.
Some tokenizers do: added tokens with lstrip / rstrip / single_word read the neighbouring text, Metaspace
with prepend_scheme "first" treats the piece at offset 0 differently, BPE dropout is random, truncation
and padding act on the whole. `SegmentEncoder.create` inspects the tokenizer, refuses (returns None with
the reason) unless every component is on a list of per-piece ones, and then checks itself against
whole-text encoding on probe strings. Callers fall back to whole-text tokenization.

A long piece (a document pasted as a plain completion prompt, with no special token in it) is cut further,
into chunks of about CHUNK_CHARS characters that each end right before a word: a space that follows a
non-space and precedes a letter. Byte-level and whitespace pre-tokenizers start a new pre-token there
(" word"), and BPE merges never cross pre-tokens, so the chunks tokenize independently too. A cut point
depends only on the text before it, so two prompts that share a long prefix share its chunks, and a
document followed by a new question re-tokenizes only the last chunk::

    piece:   [---- 2048+ chars ----| word ...][---- 2048+ chars ----| word ...][ tail, question ]
             cached                            cached                            tokenized

Chunking needs a pre-tokenizer that cuts words (without one, BPE merges may span the cut), and `create`
checks it against whole-text encoding on a long probe (punctuation, digits, quotes, double spaces,
newlines, non-Latin letters at the cuts); a tokenizer that fails keeps the piece cache without chunks.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

ID_DTYPE = np.dtype(np.int32)
# Pieces shorter than this are tokenized every time: the lock and bookkeeping cost more than they save.
MIN_CACHED_CHARS = 64
# Per-entry overhead charged besides the text and ids (dict slot, key object, array header).
ENTRY_OVERHEAD_BYTES = 256
# Pieces are cut into chunks of about this many characters (see the module docstring); 0 = never.
CHUNK_CHARS = 2048
_WORD_START = re.compile(r"(?<=\S) (?=[^\W\d_])")  # a space after a non-space, before a letter

# Normalizers and pre-tokenizers that act on each piece alone, whatever its position in the input.
_PER_PIECE_NORMALIZERS = frozenset(
    {
        "NFC",
        "NFD",
        "NFKC",
        "NFKD",
        "Lowercase",
        "Strip",
        "StripAccents",
        "Replace",
        "Prepend",
        "BertNormalizer",
    }
)
_PER_PIECE_PRE_TOKENIZERS = frozenset(
    {
        "ByteLevel",
        "Whitespace",
        "WhitespaceSplit",
        "Split",
        "Digits",
        "Punctuation",
        "BertPreTokenizer",
        "CharDelimiterSplit",
        "UnicodeScripts",
        "Metaspace",  # only with prepend_scheme "always" or "never" (checked below)
    }
)
_PROBES = (
    "Hello world",
    " leading space and trailing \n",
    "digits 12345, émoji 🙂 and 日本語",
    "",
)


def encode_ids(backend: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    """backend.encode(text).ids without the offsets and masks nobody here reads (~1.8x faster on a 10k
    text with tokenizers' encode_batch_fast; the ids are the same)."""
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None:
        return backend.encode(text, add_special_tokens=add_special_tokens).ids
    return fast([text], add_special_tokens=add_special_tokens)[0].ids


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of the segment cache."""

    num_entries: int
    num_bytes: int
    max_bytes: int
    hits: int
    misses: int


class SegmentEncoder:
    """Tokenizes text piece by piece between added tokens, with an LRU of piece text -> ids bounded by
    bytes (text + ids + a fixed overhead per entry).

    Thread-safe: `encode` may run in several executor threads at once; the LRU is guarded by a lock and
    tokenization runs outside it (two threads may tokenize the same new piece; both get equal ids).
    Build with `create`, which returns None for tokenizers where pieces are not independent.
    """

    def __init__(
        self,
        backend: Any,
        boundaries: dict[str, int],
        wrap: tuple[list[int], list[int]],
        max_bytes: int,
        min_cached_chars: int = MIN_CACHED_CHARS,
        chunk_chars: int = CHUNK_CHARS,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if min_cached_chars < 0 or chunk_chars < 0:
            raise ValueError(
                f"min_cached_chars and chunk_chars must be >= 0, got {min_cached_chars}, {chunk_chars}"
            )
        self.min_cached_chars = min_cached_chars
        self.chunk_chars = chunk_chars
        self._backend = backend
        self._boundary_ids = boundaries
        # Longest first: re's alternation then picks the longest token at the leftmost position, the
        # same leftmost-longest rule the tokenizer's own added-token matcher uses.
        ordered = sorted(boundaries, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._prefix = np.asarray(wrap[0], dtype=ID_DTYPE)
        self._suffix = np.asarray(wrap[1], dtype=ID_DTYPE)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()
        self._num_bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    @classmethod
    def create(
        cls, backend: Any, max_bytes: int, min_cached_chars: int = MIN_CACHED_CHARS
    ) -> tuple[SegmentEncoder | None, str]:
        """(encoder, "") when pieces between added tokens provably tokenize independently in `backend`
        (a tokenizers.Tokenizer), else (None, why). Pieces shorter than min_cached_chars are tokenized
        every time. Raises ValueError if max_bytes <= 0."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        why = _unsafe_reason(backend)
        if why:
            return None, why
        boundaries = {
            t.content: token_id
            for token_id, t in backend.get_added_tokens_decoder().items()
            if not t.normalized and t.content
        }
        wrap = _post_process_wrap(backend)
        if wrap is None:
            return None, "the post-processor does not add a fixed prefix/suffix"
        encoder = cls(backend, boundaries, wrap, max_bytes, min_cached_chars, chunk_chars=0)
        for probe in _probe_texts(list(boundaries)):
            for add_special in (False, True):
                whole = backend.encode(probe, add_special_tokens=add_special).ids  # the reference
                if encoder.encode(probe, add_special_tokens=add_special).tolist() != whole:
                    return None, f"piece-wise tokenization differs from whole-text on {probe!r}"
        if _splits_words(backend):
            encoder.chunk_chars = CHUNK_CHARS
            long_probe = _long_probe(CHUNK_CHARS)
            for add_special in (False, True):
                whole = backend.encode(long_probe, add_special_tokens=add_special).ids
                if encoder.encode(long_probe, add_special_tokens=add_special).tolist() != whole:
                    encoder.chunk_chars = 0  # chunk starts are special to this tokenizer: whole pieces only
        encoder.clear()
        return encoder, ""

    def encode(self, text: str, *, add_special_tokens: bool) -> np.ndarray:
        """Token ids of `text` (int32), equal to the backend's whole-text encode. Changes the LRU only."""
        parts: list[np.ndarray] = [self._prefix] if add_special_tokens and len(self._prefix) else []
        start = 0
        if self._pattern is not None:
            for match in self._pattern.finditer(text):
                if match.start() > start:
                    parts.append(self._piece(text[start : match.start()]))
                parts.append(np.asarray([self._boundary_ids[match.group()]], dtype=ID_DTYPE))
                start = match.end()
        if start < len(text):
            parts.append(self._piece(text[start:]))
        if add_special_tokens and len(self._suffix):
            parts.append(self._suffix)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=ID_DTYPE)

    def _piece(self, text: str) -> np.ndarray:
        step = self.chunk_chars
        if not step or len(text) < 2 * step:
            return self._cached(text)
        parts, start = [], 0
        while (cut := _WORD_START.search(text, start + step)) is not None:
            parts.append(self._cached(text[start : cut.start()]))
            start = cut.start()
        parts.append(self._cached(text[start:]))
        return np.concatenate(parts)

    def _cached(self, text: str) -> np.ndarray:
        if len(text) < self.min_cached_chars:
            return np.asarray(encode_ids(self._backend, text, add_special_tokens=False), dtype=ID_DTYPE)
        with self._lock:
            entry = self._entries.get(text)
            if entry is not None:
                self._entries.move_to_end(text)
                self._hits += 1
                return entry[0]
            self._misses += 1
        ids = np.asarray(encode_ids(self._backend, text, add_special_tokens=False), dtype=ID_DTYPE)
        ids.flags.writeable = False  # shared by every request that hits it
        size = len(text.encode("utf-8", "surrogatepass")) + ids.nbytes + ENTRY_OVERHEAD_BYTES
        if size <= self.max_bytes:
            with self._lock:
                if text not in self._entries:
                    self._entries[text] = (ids, size)
                    self._num_bytes += size
                    while self._num_bytes > self.max_bytes:
                        _, (_, evicted) = self._entries.popitem(last=False)
                        self._num_bytes -= evicted
        return ids

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._num_bytes, self.max_bytes, self._hits, self._misses)

    def clear(self) -> None:
        """Forget every cached piece and reset the counters."""
        with self._lock:
            self._entries.clear()
            self._num_bytes = self._hits = self._misses = 0


def _unsafe_reason(backend: Any) -> str:
    """Why pieces between added tokens might not tokenize independently in `backend` ("" if they do)."""
    if backend.truncation is not None or backend.padding is not None:
        return "truncation or padding is enabled"
    if getattr(backend, "encode_special_tokens", False):
        return "encode_special_tokens is on (added tokens are not split out)"
    for token in backend.get_added_tokens_decoder().values():
        if not token.normalized and (token.lstrip or token.rstrip or token.single_word):
            return f"added token {token.content!r} looks at its neighbours (lstrip/rstrip/single_word)"
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("dropout") not in (None, 0, 0.0):
        return "BPE dropout makes tokenization random"
    for node in _flatten(spec.get("normalizer"), "normalizers"):
        if node.get("type") not in _PER_PIECE_NORMALIZERS:
            return f"normalizer {node.get('type')!r} is not known to act per piece"
    for node in _flatten(spec.get("pre_tokenizer"), "pretokenizers"):
        kind = node.get("type")
        if kind not in _PER_PIECE_PRE_TOKENIZERS:
            return f"pre-tokenizer {kind!r} is not known to act per piece"
        if kind == "Metaspace" and node.get("prepend_scheme", "always") not in ("always", "never"):
            return "Metaspace prepend_scheme 'first' treats the first piece differently"
    return ""


def _splits_words(backend: Any) -> bool:
    """Whether a pre-tokenizer cuts text into words, so that BPE merges cannot join the two sides of a
    chunk cut. Without one (a bare BPE over whole pieces) merges may span a space: no chunking."""
    spec = json.loads(backend.to_str())
    for node in _flatten(spec.get("pre_tokenizer"), "pretokenizers"):
        kind = node.get("type")
        if kind in ("Whitespace", "WhitespaceSplit", "Metaspace", "BertPreTokenizer", "Split"):
            return True
        if kind == "ByteLevel" and node.get("use_regex", True):
            return True
    return False


def _flatten(node: dict[str, Any] | None, children: str) -> list[dict[str, Any]]:
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [leaf for child in node.get(children, []) for leaf in _flatten(child, children)]
    return [node]


def _post_process_wrap(backend: Any) -> tuple[list[int], list[int]] | None:
    """The ids the post-processor puts before and after a single input, if they are the same for every
    input (TemplateProcessing-style); None otherwise."""
    found: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for probe in ("a", "Hello world", "x y z 1 2 3"):
        plain = backend.encode(probe, add_special_tokens=False).ids
        full = backend.encode(probe, add_special_tokens=True).ids
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
        if not plain or at is None:
            return None
        found.add((tuple(full[:at]), tuple(full[at + len(plain) :])))
    if len(found) != 1:
        return None
    prefix, suffix = found.pop()
    return list(prefix), list(suffix)


def _long_probe(chunk_chars: int) -> str:
    """Prose of about 3 chunks with every kind of neighbour a cut can have: punctuation, digits, quotes,
    double spaces, newlines and non-Latin letters."""
    words = ("The", "cache", "keeps", "pages,", "\"quoted\"", "42", "items;", "émigré", "日本語", "it's",
             "done.", "Next", "line\n", "two  spaces", "(paren)", "x1", "Ωmega")  # fmt: skip
    text, i = [], 0
    while sum(map(len, text)) < 3 * chunk_chars:
        text.append(words[i % len(words)])
        i += 7
    return " ".join(text)


def _probe_texts(boundaries: list[str]) -> list[str]:
    specials = boundaries[:3] or [""]
    out = list(_PROBES)
    for i, special in enumerate(specials):
        a, b = _PROBES[i % 3], _PROBES[(i + 1) % 3]
        out += [a + special + b, special + a * 3, b + special, special + special + " " + a + special]
    return out
