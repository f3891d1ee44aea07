"""n > 1: one request per choice on the daemon, one response with a choice per index."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient

from cachemgr.daemon.errors import Overloaded
from tests.http.doubles import MODEL, ScriptedDaemon, sse_events, start_client


async def test_completion_choices_not_streamed(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.cached_tokens = 2
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Say hi", "n": 3, "seed": 40, "max_tokens": 4}
    )
    assert r.status == 200
    body = await r.json()
    assert body["choices"] == [
        {"index": i, "text": "Hell", "logprobs": None, "finish_reason": "length"} for i in range(3)
    ]
    # The prompt once, every choice's completion, the cache as the first choice found it.
    assert body["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 12,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert [s.sampling.seed for s in daemon.submitted] == [40, 41, 42]  # n different, reproducible draws
    assert all(s.token_ids == list(b"Say hi") for s in daemon.submitted)
    assert len({s.stream.request_id for s in daemon.submitted}) == 3


async def test_unseeded_choices_stay_unseeded(client: TestClient, daemon: ScriptedDaemon) -> None:
    await client.post("/v1/completions", json={"prompt": "x", "n": 2})
    assert [s.sampling.seed for s in daemon.submitted] == [None, None]
    await client.post("/v1/completions", json={"prompt": "x", "n": 2, "seed": 2**63 - 1})
    assert [s.sampling.seed for s in daemon.submitted[2:]] == [2**63 - 1, -(2**63)]  # wraps within int64


async def test_chat_choices_streamed(client: TestClient, daemon: ScriptedDaemon) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "n": 2,
            "stream": True,
            "max_tokens": 5,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert len({c["id"] for c in events[:-1]}) == 1
    # Both choices open with the assistant role, then each streams its own deltas to its own finish.
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[2:] if c["choices"][0]["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in mine) == "Hello"
        assert [c["finish_reason"] for c in mine][-1] == "length"


async def test_disconnect_aborts_every_choice(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.hold = True
    r = await client.post("/v1/completions", json={"prompt": "x", "stream": True, "n": 3})
    assert (await r.content.readuntil(b"\n\n")).startswith(b"data: ")
    r.close()
    for _ in range(100):
        if len(daemon.aborted) == 3:
            break
        await asyncio.sleep(0.02)
    assert sorted(daemon.aborted) == sorted(s.stream.request_id for s in daemon.submitted)


async def test_a_refused_choice_aborts_the_ones_already_submitted(daemon: ScriptedDaemon) -> None:
    class RefusesThird(ScriptedDaemon):
        async def submit(self, ns, token_ids, sampling, *, request_id=None):  # type: ignore[no-untyped-def]
            if len(self.submitted) == 2:
                raise Overloaded("queue full")
            return await super().submit(ns, token_ids, sampling, request_id=request_id)

    refusing = RefusesThird()
    c = await start_client(refusing)
    try:
        r = await c.post("/v1/completions", json={"prompt": "x", "n": 3})
        assert r.status == 503
        assert sorted(refusing.aborted) == sorted(s.stream.request_id for s in refusing.submitted)
        assert len(refusing.submitted) == 2
    finally:
        await c.close()


async def test_completion_logprobs_legacy_shape(client: TestClient, daemon: ScriptedDaemon) -> None:
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "logprobs": 2})
    choice = (await r.json())["choices"][0]
    assert daemon.submitted[0].sampling.logprobs == 2
    assert choice["text"] == "Hell"
    h, e, l_ = ord("H"), ord("e"), ord("l")
    assert choice["logprobs"] == {
        "tokens": ["H", "e", "l", "l"],
        "token_logprobs": [-h / 100, -e / 100, -l_ / 100, -l_ / 100],
        "top_logprobs": [{chr(t): -t / 100, chr(t + 1): -(t + 1) / 100} for t in (h, e, l_, l_)],
        "text_offset": [0, 1, 2, 3],
    }
    plain = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
    assert (await plain.json())["choices"][0]["logprobs"] is None


async def test_chat_logprobs_streamed_per_chunk(client: TestClient, daemon: ScriptedDaemon) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 5,
            "logprobs": True,
            "top_logprobs": 1,
        },
    )
    chunks = sse_events(await r.text())[:-1]
    assert daemon.submitted[0].sampling.logprobs == 1
    content = [c["choices"][0] for c in chunks if c["choices"][0]["delta"].get("content")]
    # Every content chunk carries the logprobs of exactly the tokens its text came from.
    for choice in content:
        entries = choice["logprobs"]["content"]
        assert "".join(e["token"] for e in entries) == choice["delta"]["content"]
        for e in entries:
            t = ord(e["token"])
            assert e == {
                "token": chr(t),
                "logprob": -t / 100,
                "bytes": [t],
                "top_logprobs": [{"token": chr(t), "logprob": -t / 100, "bytes": [t]}],
            }
    assert "".join(c["delta"]["content"] for c in content) == "Hello"
    assert chunks[0]["choices"][0]["logprobs"] is None  # the role chunk has no tokens


async def test_chat_logprobs_not_streamed(client: TestClient, daemon: ScriptedDaemon) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True},
    )
    logprobs = (await r.json())["choices"][0]["logprobs"]
    assert logprobs == {
        "content": [
            {"token": "H", "logprob": -ord("H") / 100, "bytes": [ord("H")], "top_logprobs": []},
            {"token": "e", "logprob": -ord("e") / 100, "bytes": [ord("e")], "top_logprobs": []},
        ],
        "refusal": None,
    }


async def test_echo_leads_the_text_with_the_prompt(client: TestClient, daemon: ScriptedDaemon) -> None:
    r = await client.post("/v1/completions", json={"prompt": "Hi ", "max_tokens": 4, "echo": True})
    assert (await r.json())["choices"][0]["text"] == "Hi Hell"
    assert daemon.submitted[0].sampling.prompt_logprobs == -1  # no logprobs asked: the cache may serve it
    ids = await client.post(
        "/v1/completions", json={"prompt": [72, 105], "max_tokens": 2, "echo": True, "n": 2}
    )
    assert [c["text"] for c in (await ids.json())["choices"]] == ["HiHe", "HiHe"]  # token ids echo as text
    r = await client.post(
        "/v1/completions", json={"prompt": "Hi ", "max_tokens": 4, "echo": True, "stream": True}
    )
    texts = [e["choices"][0]["text"] for e in sse_events(await r.text()) if e != "[DONE]" and e["choices"]]
    assert texts[0] == "Hi " and "".join(texts) == "Hi Hell"


async def test_echo_with_logprobs_scores_the_prompt(client: TestClient, daemon: ScriptedDaemon) -> None:
    """The evaluation harnesses' call: echo + logprobs + max_tokens 1. The prompt's tokens come first in
    the legacy logprobs object, the first one without a value; the offsets run through prompt and output."""
    body = {"prompt": "Hi!", "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    r = await client.post("/v1/completions", json=body)
    choice = (await r.json())["choices"][0]
    assert daemon.submitted[0].sampling.prompt_logprobs == 1
    assert choice["text"] == "Hi!H"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["H", "i", "!", "H"]
    assert lp["token_logprobs"] == [None, -ord("i") / 100, -ord("!") / 100, -ord("H") / 100]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {"i": -ord("i") / 100}
    assert lp["text_offset"] == [0, 1, 2, 3]
    streamed = await client.post("/v1/completions", json={**body, "stream": True})
    chunks = [e["choices"][0] for e in sse_events(await streamed.text()) if e != "[DONE]" and e["choices"]]
    assert chunks[0]["text"] == "Hi!" and chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert chunks[1]["logprobs"]["text_offset"] == [3]


async def test_batched_prompts_answer_n_choices_each_prompt_major(
    client: TestClient, daemon: ScriptedDaemon
) -> None:
    body = {"prompt": ["ab", "cde"], "n": 2, "max_tokens": 2, "seed": 7, "echo": True}
    r = await client.post("/v1/completions", json=body)
    out = await r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == [
        "abHe",
        "abHe",
        "cdeHe",
        "cdeHe",
    ]  # each echoes its own prompt
    assert [s.token_ids for s in daemon.submitted] == [list(b"ab"), list(b"ab"), list(b"cde"), list(b"cde")]
    assert [s.sampling.seed for s in daemon.submitted] == [7, 8, 7, 8]  # seed + choice, per prompt
    assert out["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 8,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    r = await client.post("/v1/completions", json={**body, "stream": True})
    events = [e for e in sse_events(await r.text()) if e != "[DONE]" and e["choices"]]
    assert {e["choices"][0]["index"] for e in events} == {0, 1, 2, 3}


async def test_echo_with_max_tokens_0_answers_the_prompt_alone(
    client: TestClient, daemon: ScriptedDaemon
) -> None:
    body = {"prompt": "Hi!", "max_tokens": 0, "echo": True, "logprobs": 0}
    out = await (await client.post("/v1/completions", json=body)).json()
    choice = out["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("Hi!", "length")
    assert choice["logprobs"]["tokens"] == ["H", "i", "!"]
    assert out["usage"]["completion_tokens"] == 0
    assert daemon.submitted[0].sampling.max_tokens == 1  # one token runs on the worker, unsent
    r = await client.post("/v1/completions", json={**body, "stream": True})
    chunks = [e["choices"][0] for e in sse_events(await r.text()) if e != "[DONE]" and e["choices"]]
    assert "".join(c["text"] for c in chunks) == "Hi!" and chunks[-1]["finish_reason"] == "length"
    refused = await client.post("/v1/completions", json={"prompt": "Hi!", "max_tokens": 0})
    assert refused.status == 400  # without echo there would be nothing to answer
