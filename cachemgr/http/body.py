"""JSON request bodies -> the plain dicts cachemgr.http.parse validates, fast for token-id prompts.

A 10,100-id prompt costs ~1 ms in json.loads and another ~1 ms checking each element in Python. Here
msgspec decodes the body into a struct of the fields we read, holding the prompt back as raw JSON; a
prompt that is a flat array of integers is then decoded with a typed `list[int]` decoder (which refuses
bools, floats and anything else by itself) and turned into one int64 numpy array in a single call::

    {"prompt": [1, 2, ...], "max_tokens": 1, ...}
        -> {"prompt": array([1, 2, ...]), "max_tokens": 1, ...}     (no per-element Python work)

Whatever the fast path does not take (not an object, not strict JSON, NaN, a UTF-8 BOM, other prompt
shapes, integers beyond int64...) goes through the original json.loads path, so every accepted body
yields the same values as before and every refused one the same error.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import numpy as np

from cachemgr.http.errors import bad_request

# Every top-level field cachemgr.http.parse reads (tests check it reads no other). The prompt is kept raw.
BODY_FIELDS = (
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "stream",
    "stream_options",
    "cache_salt",
    "user",
    "n",
    "best_of",
    "logprobs",
    "top_logprobs",
    "echo",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "structured_outputs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "min_tokens",
    "logit_bias",
)

_Body = msgspec.defstruct(
    "_Body",
    [("prompt", msgspec.Raw, msgspec.UNSET)] + [(name, Any, msgspec.UNSET) for name in BODY_FIELDS],
)
_BODY_DECODER = msgspec.json.Decoder(_Body)
_IDS_DECODER = msgspec.json.Decoder(list[int])
# json.loads accepts an escaped lone UTF-16 surrogate ("\udc80"); such a string cannot be encoded again
# (tokenizers, salt hashing), so the slow path refuses it. Pairs were joined by the decoder.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def decode_body(raw: bytes) -> Any:
    """The request body as Python values; a flat integer-array prompt becomes an int64 ndarray.
    Raises APIError 400 invalid_json for a body that is not JSON."""
    fast = _decode_fast(raw)
    return fast if fast is not None else decode_plain_body(raw)


def _decode_fast(raw: bytes) -> dict[str, Any] | None:
    try:
        struct = _BODY_DECODER.decode(raw)
    except (msgspec.MsgspecError, ValueError, RecursionError):
        return None  # the slow path decides (and words the error) exactly as before
    body: dict[str, Any] = {}
    for name in BODY_FIELDS:
        value = getattr(struct, name)
        if value is not msgspec.UNSET:
            body[name] = value
    if struct.prompt is not msgspec.UNSET:
        prompt = _prompt_value(bytes(struct.prompt))
        if prompt is None:
            return None
        body["prompt"] = prompt
    # No lone-surrogate check needed here: msgspec refuses every unpaired \uD800-\uDFFF escape (and raw
    # surrogate bytes), so such bodies already went to the slow path.
    return body


def _prompt_value(raw: bytes) -> Any:
    """A flat integer array as an int64 ndarray (None if it does not fit int64); anything else decoded
    generically (None if msgspec and json.loads might disagree on it)."""
    try:
        ids = _IDS_DECODER.decode(raw)
    except (msgspec.MsgspecError, ValueError, RecursionError):
        try:
            return msgspec.json.decode(raw)
        except (msgspec.MsgspecError, ValueError, RecursionError):
            return None
    if not ids:
        return ids  # an empty prompt: parse refuses it with its own message
    try:
        return np.array(ids, dtype=np.int64)
    except OverflowError:
        return None


def decode_plain_body(raw: bytes) -> Any:
    """Any JSON body as Python values, every field kept (json.loads). Raises APIError 400 invalid_json."""
    try:
        body = json.loads(raw)
        if _SURROGATE_ESCAPE.search(raw):
            json.dumps(body, ensure_ascii=False).encode()  # raises UnicodeError for a lone surrogate
        return body
    except (ValueError, UnicodeError):
        raise bad_request("We could not parse the JSON body of your request.", code="invalid_json") from None
