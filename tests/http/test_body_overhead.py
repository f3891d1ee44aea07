"""The fast request path: cachemgr.http.body decodes every body to what json.loads gives (a flat integer
prompt as an int64 array), parse reads no field the decoder drops, and token-id prompts are checked
and passed on as int32 arrays with the same errors as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from cachemgr.config import build_config
from cachemgr.http import build_http_app
from cachemgr.http.body import BODY_FIELDS, decode_body
from cachemgr.http.errors import APIError
from cachemgr.http.parse import parse_chat, parse_completion
from cachemgr.http.tokens import TokenizerAdapter
from shared.tokenizer import load_tokenizer
from tests.http.doubles import ByteTokenizer, ScriptedDaemon

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
)
_PROMPTS = st.one_of(
    st.lists(st.integers(min_value=-(2**65), max_value=2**65), max_size=20),
    st.lists(st.lists(st.integers(min_value=0, max_value=9), max_size=3), max_size=2),
    _VALUES,
)


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(st.sampled_from([*BODY_FIELDS, "prompt", "frobnicate"]), _VALUES, max_size=6),
    prompt=_PROMPTS,
    ensure_ascii=st.booleans(),
)
def test_decode_body_equals_json_loads(fields: dict[str, Any], prompt: Any, ensure_ascii: bool) -> None:
    raw = json.dumps({**fields, "prompt": prompt}, ensure_ascii=ensure_ascii).encode()
    decoded = decode_body(raw)
    expected = json.loads(raw)
    expected.pop("frobnicate", None)  # unknown fields: parse ignores them, the fast path drops them
    decoded.pop("frobnicate", None)
    assert {k: _plain(v) for k, v in decoded.items()} == expected
    if isinstance(decoded["prompt"], np.ndarray):
        assert decoded["prompt"].dtype == np.int64
        assert all(type(t) is int for t in prompt) and prompt  # only non-empty flat int lists


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[1, 2]",
        b'"text"',
        b'{"prompt": NaN}',
        b'\xef\xbb\xbf{"prompt": [1]}',  # json.loads accepts a UTF-8 BOM; so do we, via the slow path
        b'{"prompt": [1, true]}',
        b'{"prompt": [1e3]}',
        b'{"prompt": [99999999999999999999999]}',
        b'{"prompt": "\\ud83d\\ude00"}',
        b'{"prompt": "\xed\xa0\x80"}',
        b'{"prompt": [1], "temperature": 1e400}',
    ],
)
def test_unusual_bodies_decode_as_json_loads_does(raw: bytes) -> None:
    try:
        expected: Any = json.loads(raw)
    except ValueError:
        with pytest.raises(APIError) as info:
            decode_body(raw)
        assert (info.value.status, info.value.code) == (400, "invalid_json")
        return
    decoded = decode_body(raw)
    got = _plain(decoded["prompt"]) if isinstance(decoded, dict) else decoded
    assert repr(got) == repr(expected["prompt"] if isinstance(expected, dict) else expected)  # NaN too


@pytest.mark.parametrize("raw", [b'{"prompt": "\\udc80"}', b'{"prompt": "x", "user": "\\ud800"}', b"{"])
def test_lone_surrogates_and_broken_json_are_invalid_json(raw: bytes) -> None:
    with pytest.raises(APIError) as info:
        decode_body(raw)
    assert (info.value.status, info.value.code, info.value.message) == (
        400,
        "invalid_json",
        "We could not parse the JSON body of your request.",
    )


class _Recording(dict[str, Any]):
    """A body that remembers which top-level fields were read."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def test_parse_reads_only_fields_the_fast_decoder_keeps() -> None:
    completion = _Recording({"prompt": [1, 2], "max_tokens": 3, "stop": "x", "stream": True})
    parse_completion(completion)
    chat = _Recording({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2})
    parse_chat(chat)
    assert (completion.read | chat.read) - {"prompt"} <= set(BODY_FIELDS)
    assert {"prompt", "messages", "max_completion_tokens", "stream_options"} <= completion.read | chat.read


def test_array_prompt_parses_to_the_same_request_as_a_list() -> None:
    raw = json.dumps({"prompt": [[5, 6, 7]], "max_tokens": 2}).encode()  # a batch of one: slow path
    assert parse_completion(decode_body(raw)).prompt == (5, 6, 7)
    fast = parse_completion(decode_body(b'{"prompt": [5, 6, 7], "max_tokens": 2}'))
    assert isinstance(fast.prompt, np.ndarray)
    assert fast.prompt.tolist() == [5, 6, 7]
    assert fast.params == parse_completion({"prompt": [5, 6, 7], "max_tokens": 2}).params
    with pytest.raises(APIError, match="'prompt' must be a non-empty string or a non-empty array"):
        parse_completion(decode_body(b'{"prompt": []}'))


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([1, 2, 300, -1], "prompt: token id 300 is outside the vocabulary [0, 256)"),
        ([-5, 2], "prompt: token id -5 is outside the vocabulary [0, 256)"),
        ([2**63 - 1], f"prompt: token id {2**63 - 1} is outside the vocabulary [0, 256)"),
    ],
)
def test_check_ids_same_error_for_arrays_and_lists(ids: list[int], message: str) -> None:
    adapter = TokenizerAdapter(ByteTokenizer())
    for given_ids in (ids, np.array(ids, dtype=np.int64)):
        with pytest.raises(APIError) as info:
            adapter.check_ids(given_ids, "prompt")
        assert (info.value.status, info.value.message, info.value.param) == (400, message, "prompt")
    checked = adapter.check_ids(np.array([0, 7, 255]), "prompt")
    assert (checked.dtype, checked.tolist()) == (np.dtype(np.int32), [0, 7, 255])


def test_adapter_cache_setting() -> None:
    with pytest.raises(ValueError, match="cache_bytes must be >= 0"):
        TokenizerAdapter(ByteTokenizer(), cache_bytes=-1)
    adapter = TokenizerAdapter(ByteTokenizer(), cache_bytes=1 << 20)  # no segment_encoder: whole texts
    assert adapter.cache_stats is None
    assert adapter.encode("hé").tolist() == [104, 195, 169]


def test_tokenize_cache_size_flag() -> None:
    assert build_config([], {}).tokenize_cache_size == 64 * 1024 * 1024
    assert build_config(["--tokenize-cache-size", "0"], {}).tokenize_cache_size == 0
    assert build_config([], {"RADIXKV_TOKENIZE_CACHE_SIZE": "off"}).tokenize_cache_size == 0
    assert build_config([], {"RADIXKV_TOKENIZE_CACHE_SIZE": "1GiB"}).tokenize_cache_size == 1 << 30


async def test_chat_and_text_ids_through_the_app_equal_whole_text(smollm2_gguf: Path) -> None:
    tokenizer = load_tokenizer(smollm2_gguf)
    system = "You are the support assistant of a bicycle shop. Be brief. " * 40
    bodies = [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]},
        )
        for q in ("How much is a helmet?", "Opening hours on <|im_end|> Sunday?")
    ] + [("/v1/completions", {"prompt": system + "<|im_start|>Q: deposit?"})]
    submitted: dict[int, list[list[int]]] = {}
    for cache_bytes in (0, 1 << 20):
        daemon = ScriptedDaemon(output=[42])
        app = build_http_app(daemon, tokenizer, model_name="m", tokenize_cache_bytes=cache_bytes)
        async with TestClient(TestServer(app)) as client:
            for path, body in bodies:
                resp = await client.post(path, json={**body, "max_tokens": 1})
                assert resp.status == 200
        submitted[cache_bytes] = [s.token_ids for s in daemon.submitted]
    messages = [b["messages"] for _, b in bodies[:2]]
    expected = [tokenizer.encode_chat(m) for m in messages] + [tokenizer.encode(bodies[2][1]["prompt"])]
    assert [[int(t) for t in ids] for ids in submitted[0]] == expected
    assert [[int(t) for t in ids] for ids in submitted[1 << 20]] == expected
