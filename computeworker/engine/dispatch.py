"""A Dispatch checked and turned into the engine's Request: the page table, the cached prefix, the
copy-on-write of a full hit, the stop-string matcher, the structured output's grammar matcher. Raises
ValueError, changing nothing, for anything the daemon should never have sent (the runtime answers it with
a WorkerError)."""

from __future__ import annotations

import numpy as np

from computeworker.engine.request import Request
from computeworker.engine.stop import DetokenizerSource, StopStringMatcher
from computeworker.engine.structured import StructuredDecoding
from shared.ids import bytes_to_ids
from shared.protocol import Dispatch, FinishReason


def request_from_dispatch(
    msg: Dispatch,
    page_size: int,
    context_len: int,
    num_pool_pages: int,
    seed: int,
    tokenizer: DetokenizerSource,
    structured: StructuredDecoding | None = None,
) -> Request:
    """The Request of `msg`; `seed` is its sampling stream's (the request's own, or one the engine drew).
    structured: compiles the request's StructuredOutput (None: this worker refuses such requests)."""
    prompt = bytes_to_ids(msg.tokens)  # a view of the frame: never copied into Python ints
    prefix = bytes_to_ids(msg.prefix_page_ids)
    new = bytes_to_ids(msg.new_page_ids)
    msg.sampling.validate()
    if not len(prompt):
        raise ValueError("empty prompt")
    if not 0 <= msg.matched_len <= len(prompt) or msg.matched_len % page_size:
        raise ValueError(f"matched_len {msg.matched_len} is not a page boundary within the prompt")
    if not 0 <= msg.num_generated < len(prompt):
        raise ValueError(f"num_generated {msg.num_generated} is not within the {len(prompt)} tokens")
    if msg.sampling.prompt_logprobs >= 0 and (msg.matched_len or msg.num_generated):
        raise ValueError(
            "prompt_logprobs need the whole prompt computed: no cached prefix, no resumed output"
        )
    if len(prefix) != msg.matched_len // page_size:
        raise ValueError(f"{len(prefix)} prefix pages for matched_len {msg.matched_len}")
    page_table = np.concatenate([prefix, new])  # a writable copy: CommitAck rewrites its head
    check_page_ids(page_table, num_pool_pages)
    grammar = None
    if msg.sampling.structured is not None:
        if structured is None:
            raise ValueError("this worker has no grammar engine for structured output")
        earlier = prompt[len(prompt) - msg.num_generated :]  # what earlier attempts generated
        grammar = structured.start(msg.sampling.structured, earlier)
    req = Request(
        request_id=msg.request_id,
        prompt=prompt,
        prompt_len=len(prompt),
        matched_len=msg.matched_len,
        sampling=msg.sampling,
        page_size=page_size,
        max_len=min(len(prompt) + msg.sampling.max_tokens, context_len),
        page_table=page_table,
        num_computed=msg.matched_len,
        sample_seed=seed,
        sample_offset=msg.num_generated,
        grammar=grammar,
    )
    if msg.matched_len == len(prompt):
        # Full hit: recompute the last prompt token into a private copy of its page.
        req.num_computed = len(prompt) - 1
        req.cow_source = int(prefix[-1])
        req.page_table = np.delete(page_table, len(prefix) - 1)
    if msg.sampling.stop:
        req.stop_matcher = StopStringMatcher(msg.sampling.stop, tokenizer.detokenizer(prompt.tolist()))
    if len(prompt) >= context_len:
        req.finish(FinishReason.LENGTH)
    return req


def check_page_ids(page_ids: np.ndarray, num_pool_pages: int) -> None:
    """ValueError unless every id is a page of the pool and none repeats."""
    if len(page_ids) == 0:
        return
    if page_ids.min() < 0 or page_ids.max() >= num_pool_pages:
        raise ValueError(f"page ids outside the pool of {num_pool_pages} pages")
    if len(np.unique(page_ids)) != len(page_ids):
        raise ValueError("duplicate page ids")
