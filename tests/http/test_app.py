"""The HTTP API surface against a scripted daemon (real RequestStream) and a byte-level tokenizer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cachemgr.cache import Namespace
from cachemgr.daemon.errors import NoWorkers, Overloaded, PromptTooLarge, ShuttingDown
from cachemgr.http.auth import derive_key_salt
from shared.protocol import SamplingParams
from tests.http.doubles import MODEL, ScriptedDaemon, sse_events, start_client


async def test_health_and_models_and_metrics(client: TestClient, daemon: ScriptedDaemon) -> None:
    r = await client.get("/health")
    assert (r.status, await r.json()) == (
        200,
        {"status": "ok", "workers": 1, "ready_workers": 1, "model": MODEL},
    )
    daemon.num_warming = 1  # registered, still warming up: not serving yet
    r = await client.get("/health")
    assert (r.status, await r.json()) == (
        503,
        {"status": "starting", "workers": 1, "ready_workers": 0, "model": MODEL},
    )
    daemon.num_workers, daemon.num_warming = 0, 0
    r = await client.get("/health")
    assert (r.status, await r.json()) == (
        503,
        {"status": "no_workers", "workers": 0, "ready_workers": 0, "model": MODEL},
    )
    r = await client.get("/v1/models")
    body = await r.json()
    assert [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == [(MODEL, "model", "radixkv")]
    assert body["object"] == "list"
    assert (await client.get(f"/v1/models/{MODEL}")).status == 200
    assert (await client.get("/v1/models/other")).status == 404
    r = await client.get("/metrics")
    assert (r.status, await r.read(), r.headers["Content-Type"]) == (
        200,
        b"radixkv_up 1\n",
        "text/plain; version=0.0.4; charset=utf-8",
    )


async def test_completion_not_streamed(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.cached_tokens = 3
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Say hi", "temperature": 0, "max_tokens": 50}
    )
    assert r.status == 200
    body = await r.json()
    assert body["id"].startswith("cmpl-") and len(body["id"]) == 5 + 32
    assert isinstance(body["created"], int)
    del body["id"], body["created"]
    assert body == {
        "object": "text_completion",
        "model": MODEL,
        "choices": [{"index": 0, "text": "Hello world", "logprobs": None, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 6,
            "completion_tokens": 11,
            "total_tokens": 17,
            "prompt_tokens_details": {"cached_tokens": 3},
        },
        "system_fingerprint": None,
    }
    (sub,) = daemon.submitted
    assert sub.token_ids == list(b"Say hi")
    assert sub.sampling == SamplingParams(max_tokens=50, temperature=0.0)
    assert sub.namespace == Namespace(model=MODEL, salt="")


async def test_completion_token_ids_and_length_finish(client: TestClient, daemon: ScriptedDaemon) -> None:
    r = await client.post("/v1/completions", json={"prompt": [72, 105], "max_tokens": 4})
    body = await r.json()
    assert body["choices"][0]["text"] == "Hell"
    assert body["choices"][0]["finish_reason"] == "length"
    assert daemon.submitted[0].token_ids == [72, 105]


async def test_completion_default_max_tokens_is_16(client: TestClient, daemon: ScriptedDaemon) -> None:
    await client.post("/v1/completions", json={"prompt": "x"})
    assert daemon.submitted[0].sampling.max_tokens == 16


async def test_completion_stream_with_usage(client: TestClient, daemon: ScriptedDaemon) -> None:
    r = await client.post(
        "/v1/completions", json={"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.headers["Content-Type"] == "text/event-stream"
    events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    ids = {e["id"] for e in events[:-1]}
    assert len(ids) == 1
    texts = [(e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in events[:-2]]
    assert texts == [("Hel", None), ("lo ", None), ("wor", None), ("ld", None), ("", "stop")]
    assert all(e["usage"] is None and e["object"] == "text_completion" for e in events[:-2])
    assert events[-2]["choices"] == []
    assert events[-2]["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 11,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_chat_stream_shapes(client: TestClient, daemon: ScriptedDaemon) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    r = await client.post(
        "/v1/chat/completions", json={"messages": messages, "stream": True, "max_tokens": 5}
    )
    events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hel"}, None),
        ({"content": "lo"}, None),
        ({}, "length"),
    ]
    assert daemon.submitted[0].token_ids == list(b"<system>S\n<user>hi\n<assistant>")


async def test_chat_not_streamed_and_default_max_tokens(client: TestClient, daemon: ScriptedDaemon) -> None:
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    body = await r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert daemon.submitted[0].sampling.max_tokens == 1024


async def test_stop_string_trimmed_and_request_stopped(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.hold = True  # the worker would go on: the API must cut the text and abort it
    r = await client.post("/v1/completions", json={"prompt": "x", "stop": ["o w"], "stream": True})
    events = sse_events(await r.text())
    got = [(e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in events[:-1]]
    assert got == [("Hel", None), ("l", None), ("", "stop")]
    assert daemon.aborted == [daemon.submitted[0].stream.request_id]


async def test_multibyte_text_split_across_frames(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.output = list("héllo ✓".encode())
    daemon.frame = 1
    r = await client.post("/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 100})
    events = sse_events(await r.text())
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "héllo ✓"
    assert all("\ufffd" not in e["choices"][0]["text"] for e in events[:-1])


async def test_failure_mid_stream_is_reported_in_band(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.fail_after = 1
    r = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    events = sse_events(await r.text())
    assert events[0]["choices"][0]["text"] == "Hel"
    assert events[1] == {
        "error": {
            "message": "The request failed: worker crashed",
            "type": "service_unavailable_error",
            "param": None,
            "code": "request_failed",
        }
    }
    assert events[2] == "[DONE]"
    r = await client.post("/v1/completions", json={"prompt": "x"})
    assert (r.status, (await r.json())["error"]["code"]) == (503, "request_failed")


async def test_client_disconnect_aborts_the_request(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.hold = True
    r = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert (await r.content.readuntil(b"\n\n")).startswith(b"data: ")
    r.close()
    for _ in range(100):
        if daemon.aborted:
            break
        await asyncio.sleep(0.02)
    assert daemon.aborted == [daemon.submitted[0].stream.request_id]


def _err(
    status: int, message: str, type_: str, param: str | None, code: str | None
) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def _status_body(resp: Any) -> tuple[int, dict[str, Any]]:
    return resp.status, await resp.json()


async def test_error_shapes(client: TestClient, daemon: ScriptedDaemon) -> None:
    post = client.post
    assert await _status_body(await post("/v1/completions", data=b"{not json")) == _err(
        400,
        "We could not parse the JSON body of your request.",
        "invalid_request_error",
        None,
        "invalid_json",
    )
    assert await _status_body(await post("/v1/completions", json={"prompt": "x", "model": "gpt-9"})) == _err(
        404, "The model 'gpt-9' does not exist.", "invalid_request_error", "model", "model_not_found"
    )
    assert await _status_body(await post("/v1/completions", json={"prompt": [1, 256]})) == _err(
        400,
        "prompt: token id 256 is outside the vocabulary [0, 256)",
        "invalid_request_error",
        "prompt",
        None,
    )
    assert await _status_body(await post("/v1/completions", json={"prompt": "x", "max_tokens": 0})) == _err(
        400, "max_tokens must be at least 1", "invalid_request_error", "max_tokens", None
    )
    r = await client.get("/v1/nothing")
    assert (await _status_body(r))[0] == 404
    assert (await r.json())["error"]["type"] == "invalid_request_error"
    r = await client.get("/v1/completions")
    assert r.status == 405
    assert daemon.submitted == []


async def test_template_refusal_is_400(client: TestClient, daemon: ScriptedDaemon) -> None:
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "x"}]})
    assert await _status_body(r) == _err(
        400,
        "Invalid conversation: a conversation cannot start with the assistant",
        "invalid_request_error",
        "messages",
        None,
    )


@pytest.mark.parametrize(
    ("refusal", "expected"),
    [
        (
            NoWorkers("no worker is registered"),
            _err(503, "no worker is registered", "service_unavailable_error", None, "no_workers"),
        ),
        (Overloaded("queue full"), _err(503, "queue full", "service_unavailable_error", None, "overloaded")),
        (
            PromptTooLarge("prompt of 9000 tokens exceeds the context (8192)"),
            _err(
                400,
                "prompt of 9000 tokens exceeds the context (8192)",
                "invalid_request_error",
                "prompt",
                "context_length_exceeded",
            ),
        ),
    ],
)
async def test_daemon_refusals(
    client: TestClient, daemon: ScriptedDaemon, refusal: Exception, expected
) -> None:
    daemon.refuse = refusal
    assert await _status_body(await client.post("/v1/completions", json={"prompt": "x"})) == expected


async def test_request_too_large_is_413() -> None:
    c = await start_client(ScriptedDaemon(), max_request_bytes=2048)
    try:
        r = await c.post("/v1/completions", json={"prompt": "x" * 4096})
        assert (r.status, (await r.json())["error"]["code"]) == (413, "request_too_large")
    finally:
        await c.close()


async def test_api_keys_and_salts() -> None:
    daemon = ScriptedDaemon()
    c = await start_client(daemon, api_keys=frozenset({"ka", "kb"}), salt_from_api_key=True)
    try:
        r = await c.post("/v1/completions", json={"prompt": "x"})
        assert await _status_body(r) == _err(
            401,
            "Missing API key: send 'Authorization: Bearer <key>'.",
            "authentication_error",
            None,
            "invalid_api_key",
        )
        r = await c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert r.status == 401
        assert (await c.get("/health")).status == 200  # probes need no key
        for key, salt in (("ka", ""), ("kb", ""), ("ka", "t1")):
            r = await c.post(
                "/v1/completions",
                json={"prompt": "x", "cache_salt": salt},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status == 200
        assert [s.namespace for s in daemon.submitted] == [
            Namespace(MODEL, f"key:{derive_key_salt('ka')}:"),
            Namespace(MODEL, f"key:{derive_key_salt('kb')}:"),
            Namespace(MODEL, f"key:{derive_key_salt('ka')}:t1"),
        ]
    finally:
        await c.close()


async def test_cache_salt_passed_through_without_keys(client: TestClient, daemon: ScriptedDaemon) -> None:
    await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "cache_salt": "s1"}
    )
    assert daemon.submitted[0].namespace == Namespace(MODEL, "s1")


async def test_tokenize_and_detokenize_match_what_generation_uses(
    client: TestClient, daemon: ScriptedDaemon
) -> None:
    r = await client.post("/tokenize", json={"prompt": "hi!"})
    assert (r.status, await r.json()) == (
        200,
        {"count": 3, "max_model_len": daemon.max_context_len, "tokens": [104, 105, 33]},
    )
    messages = [{"role": "user", "content": "yo"}]
    r = await client.post("/tokenize", json={"messages": messages, "model": MODEL})
    tokens = (await r.json())["tokens"]
    await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert tokens == daemon.submitted[-1].token_ids  # exactly the prompt a chat request sends
    r = await client.post("/detokenize", json={"tokens": tokens})
    assert (await r.json()) == {"prompt": "<user>yo\n<assistant>"}
    tools = [{"type": "function", "function": {"name": "f"}}]
    r = await client.post("/tokenize", json={"messages": messages, "tools": tools})
    await client.post("/v1/chat/completions", json={"messages": messages, "tools": tools, "max_tokens": 1})
    assert (
        (await r.json())["tokens"]
        == daemon.submitted[-1].token_ids
        == list(b"<tools>f\n<user>yo\n<assistant>")
    )
    assert len(daemon.submitted) == 2  # tokenizing submits nothing


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {}, None),
        ("/tokenize", {"prompt": "a", "messages": []}, None),
        ("/tokenize", {"prompt": ""}, "prompt"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ("/detokenize", {"tokens": [1, "a"]}, "tokens"),
        ("/detokenize", {"tokens": [300]}, "tokens"),
        ("/detokenize", [], "tokens"),
    ],
)
async def test_tokenize_refuses_bad_bodies(
    client: TestClient, path: str, body: object, param: str | None
) -> None:
    r = await client.post(path, json=body)
    assert r.status == 400 and (await r.json())["error"]["param"] == param


async def test_tokenize_needs_the_api_key_when_keys_are_set(daemon: ScriptedDaemon) -> None:
    client = await start_client(daemon, api_keys=frozenset({"k1"}))
    try:
        assert (await client.post("/tokenize", json={"prompt": "x"})).status == 401
        ok = await client.post("/detokenize", json={"tokens": [120]}, headers={"Authorization": "Bearer k1"})
        assert (ok.status, await ok.json()) == (200, {"prompt": "x"})
    finally:
        await client.close()


async def test_a_draining_daemon_answers_503(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.draining = True
    r = await client.get("/health")
    assert (r.status, (await r.json())["status"]) == (503, "draining")
    daemon.refuse = ShuttingDown("the server is shutting down")
    r = await client.post("/v1/completions", json={"prompt": "x"})
    assert (r.status, (await r.json())["error"]["code"]) == (503, "shutting_down")
