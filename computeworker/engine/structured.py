"""Structured output on the worker: grammar-constrained decoding with xgrammar.

A request whose SamplingParams carry a StructuredOutput gets a grammar matcher when it is dispatched (the
grammar compiled against this worker's vocabulary, cached, so a schema clients resend compiles once).
Every step, after the logits processing, the rows that have one keep only the tokens that can continue a
match: the token each row sampled last step is fed to its matcher and its bitmask filled, on the host
while the GPU runs the forward pass (many rows on several threads), then one kernel applies the bitmasks.
Once the grammar is complete the only tokens left are its stop tokens, which are the engine's EOS ids, so
the request finishes with "stop".

A re-dispatched request replays the tokens earlier attempts generated into its new matcher.

The grammar engine and the vocabulary table it needs load on the first structured request (~2 s): a
worker that never sees one never loads them.

Thread-safety: compiling (`compiled`, `start`) may run on any thread; `mask` runs on the engine's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.grammar import error_text, grammar_of, xgrammar
from shared.protocol import StructuredOutput

log = logging.getLogger(__name__)

Matcher = Any  # xgrammar.GrammarMatcher (the module is imported on first use)
MAX_COMPILED = 64  # compiled grammars kept per worker
PARALLEL_ROWS = 8  # from this many constrained rows a step feeds and fills them on several threads
NO_TOKEN = -1


@dataclass(slots=True)
class GrammarState:
    """One request's grammar: the matcher, and the token sampled last step that it has not taken yet
    (fed at the next step's mask, while the GPU runs that step's forward pass)."""

    matcher: Matcher
    pending: int = NO_TOKEN


class StructuredDecoding:
    """Compiles StructuredOutputs for one vocabulary, hands out per-request matchers and masks logits."""

    def __init__(
        self,
        make_tokenizer_info: Callable[[], Any],
        vocab_size: int,
        stop_token_ids: Sequence[int],
        fill_threads: int = 0,
    ) -> None:
        """make_tokenizer_info: builds xgrammar's TokenizerInfo with `stop_token_ids` as its stop tokens
        (called once, on first use). vocab_size: the width of the model's logits (may exceed the
        tokenizer's: the extra ids are never allowed). stop_token_ids: the tokens that end a complete
        output; the engine must treat each as EOS (it checks).
        fill_threads: host threads filling a step's bitmasks and advancing its matchers (0: half the
        cores, at most 8)."""
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self.fill_threads = fill_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        self._batch_matcher: Any = None  # see _batch
        self._batch_threads = 0
        self._make_tokenizer_info = make_tokenizer_info
        self._compiler: Any = None
        self._compiled: dict[tuple[str, str], Any] = {}  # (kind, spec) -> CompiledGrammar, LRU order
        self._bitmask: torch.Tensor | None = None  # see _host_bitmask
        self._lock = threading.Lock()  # the compiled cache (held for dict operations only)
        self._compiler_lock = threading.Lock()  # building the compiler: seconds, never with _lock

    @classmethod
    def for_tokenizer(
        cls, backend: Any, vocab_size: int, stop_token_ids: Sequence[int], fill_threads: int = 0
    ) -> StructuredDecoding:
        """For a Hugging Face `tokenizers.Tokenizer` (byte-level, byte-fallback or plain vocabularies)."""

        def make() -> Any:
            from transformers import PreTrainedTokenizerFast

            wrapped = PreTrainedTokenizerFast(tokenizer_object=backend)
            return xgrammar().TokenizerInfo.from_huggingface(
                wrapped, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
            )

        return cls(make, vocab_size, stop_token_ids, fill_threads)

    @classmethod
    def for_vocabulary(
        cls, tokens: Sequence[str], stop_token_ids: Sequence[int], fill_threads: int = 0
    ) -> StructuredDecoding:
        """For a vocabulary whose token i is the text tokens[i] (no byte encoding)."""

        def make() -> Any:
            return xgrammar().TokenizerInfo(
                list(tokens), vocab_size=len(tokens), stop_token_ids=list(stop_token_ids)
            )

        return cls(make, len(tokens), stop_token_ids, fill_threads)

    def compiled(self, structured: StructuredOutput) -> Any:
        """`structured` compiled for this vocabulary (the last MAX_COMPILED are kept). The first call
        loads the grammar engine (~2 s): the worker runtime calls it on a thread (GrammarCompiles).
        ValueError if the spec does not compile or the grammar engine fails (the request is refused, not
        the worker)."""
        key = (structured.kind, structured.spec)
        with self._lock:
            found = self._compiled.pop(key, None)
            if found is not None:
                self._compiled[key] = found  # most recently used last
                return found
        start = time.perf_counter()
        try:
            compiled = self._compiler_once().compile_grammar(grammar_of(structured))
        except ValueError:
            raise
        except Exception as exc:  # the grammar engine failed (not installed, a C++ check): refuse the
            # request, not the worker
            raise ValueError(f"structured output unavailable: {error_text(exc)}") from exc
        seconds = time.perf_counter() - start
        if seconds > 0.05:
            log.info("compiled a %s grammar in %.0f ms", structured.kind, seconds * 1e3)
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > MAX_COMPILED:
                self._compiled.pop(next(iter(self._compiled)))
        return compiled

    def is_compiled(self, structured: StructuredOutput) -> bool:
        """Whether `compiled` would answer from its cache (no compiling, no grammar engine load)."""
        with self._lock:
            return (structured.kind, structured.spec) in self._compiled

    def start(self, structured: StructuredOutput, replay: np.ndarray | Sequence[int] = ()) -> GrammarState:
        """A fresh matcher for `structured` that has accepted `replay` (tokens an earlier attempt
        generated). ValueError if the spec does not compile or the replayed tokens do not match it."""
        matcher = xgrammar().GrammarMatcher(self.compiled(structured))
        for token in replay:
            if not matcher.accept_token(int(token)):
                raise ValueError("the tokens generated before the re-dispatch do not match the grammar")
        return GrammarState(matcher)

    def mask(
        self, logits: torch.Tensor, states: Sequence[GrammarState | None], *, owned: bool
    ) -> tuple[torch.Tensor, list[int]]:
        """Feed every row's pending token to its matcher, then mask its logits to the tokens its grammar
        allows next; rows without a state are untouched. owned: `logits` is float32 and may be changed
        in place (the logits processing's copy); else the result is a new float32 tensor (`logits` itself
        when no row has a state). Also returns the rows whose grammar cannot go on: it refused the
        pending token (which its last mask prevents), or no token of the vocabulary continues the match
        (a vocabulary without single-byte tokens can strand a partial one). Those rows are left
        unmasked; the engine ends their requests and discards what they sample.

        Nothing here waits for the GPU: both host parts (accepting, filling the bitmask into a pinned
        buffer) run while the forward pass is on the GPU, the copy does not block and the kernel queues
        behind the forward. The buffer is reused by the next call, which the engine makes only after
        sampling read this step's tokens (a sync that orders this copy before it)."""
        rows = [i for i, st in enumerate(states) if st is not None]
        if not rows:
            return logits, []
        xgr = xgrammar()
        matchers = [states[i].matcher for i in rows]  # type: ignore[union-attr]
        parallel = len(rows) >= PARALLEL_ROWS and self.fill_threads > 1
        pending = [states[i].pending for i in rows]  # type: ignore[union-attr]
        fed = [(i, m, t) for i, m, t in zip(rows, matchers, pending, strict=True) if t != NO_TOKEN]
        stuck: set[int] = set()
        if fed:
            if parallel:
                accepted = self._batch().batch_accept_token([m for _, m, _ in fed], [t for _, _, t in fed])
            else:
                accepted = [m.accept_token(token) for _, m, token in fed]
            stuck = {i for (i, _, _), ok in zip(fed, accepted, strict=True) if not ok}
            for i, _, _ in fed:
                states[i].pending = NO_TOKEN  # type: ignore[union-attr]
        vocab = logits.shape[-1]
        bitmask = self._host_bitmask(len(states), vocab, pinned=logits.is_cuda)
        if parallel:
            self._batch().batch_fill_next_token_bitmask(matchers, bitmask, rows)
        else:
            for i, m in zip(rows, matchers, strict=True):
                m.fill_next_token_bitmask(bitmask, i)
        # numpy, not torch: a torch CPU reduction wakes its thread pool, whose spinning threads then take
        # the cores the grammar engine's fill threads need (3x slower fills on an H200 host, run 53).
        allows_some = bitmask.numpy().any(axis=1).tolist()
        stuck.update(i for i in rows if not allows_some[i])
        live = [i for i in rows if i not in stuck]
        if not live:
            return logits, sorted(stuck)
        if owned:
            out = logits
        else:  # (logits.to(float32, copy=True) takes milliseconds on CPU: a slow path in torch)
            out = logits.clone() if logits.dtype == torch.float32 else logits.float()
        on_device = bitmask.to(out.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(out, on_device, vocab_size=vocab, indices=live)
        return out, sorted(stuck)

    def _batch(self) -> Any:
        """xgrammar's batch matcher: fills and accepts for many rows on fill_threads threads."""
        if self._batch_matcher is None or self._batch_threads != self.fill_threads:
            self._batch_matcher = xgrammar().BatchGrammarMatcher(self.fill_threads)
            self._batch_threads = self.fill_threads
        return self._batch_matcher

    def _host_bitmask(self, num_rows: int, vocab: int, *, pinned: bool) -> torch.Tensor:
        """An int32 [num_rows, ceil(vocab / 32)] view of a buffer kept across steps (page-locked for
        CUDA, so the copy to the device does not block)."""
        words = -(-vocab // 32)
        buf = self._bitmask
        if buf is None or buf.shape[0] < num_rows or buf.shape[1] != words or buf.is_pinned() != pinned:
            rows = max(num_rows, 2 * (buf.shape[0] if buf is not None else 0), 16)
            buf = torch.empty((rows, words), dtype=torch.int32, pin_memory=pinned)
            self._bitmask = buf
        return buf[:num_rows]

    def _compiler_once(self) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                start = time.perf_counter()
                info = self._make_tokenizer_info()
                self._compiler = xgrammar().GrammarCompiler(info, max_threads=1, cache_enabled=False)
                log.info("grammar engine ready in %.2f s", time.perf_counter() - start)
            return self._compiler
