"""Test doubles for the HTTP app's collaborators, for testing the API surface alone: a byte-level
tokenizer (one token per UTF-8 byte, so multi-byte characters span tokens) and a daemon that answers
through the real RequestStream with a scripted output. End-to-end tests use the real daemon."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from cachemgr.daemon.errors import RequestFailed
from cachemgr.daemon.stream import RequestStream, StreamEvent
from cachemgr.http import build_http_app
from shared.detokenizer import IncrementalDetokenizer
from shared.protocol import FinishReason, SamplingParams


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode(errors="replace")

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """A toy template: "<tools>f,g\n" when there are tools, then "<role>content\n" per message (an
        assistant's tool calls as "name(arguments as JSON)")."""
        if messages[0]["role"] == "assistant":
            raise ValueError("a conversation cannot start with the assistant")
        head = f"<tools>{','.join(t['function']['name'] for t in tools)}\n" if tools else ""
        turns = "".join(f"<{m['role']}>{m['content']}{_calls(m)}\n" for m in messages)
        return self.encode(head + turns + ("<assistant>" if add_generation_prompt else ""))

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.decode, prompt_ids)


def _calls(message: dict[str, Any]) -> str:
    calls = message.get("tool_calls", [])
    return "".join(f"{c['function']['name']}({json.dumps(c['function']['arguments'])})" for c in calls)


class TagTokenizer(ByteTokenizer):
    """For the scripted worker's outputs (ids up to 1000): text encodes as bytes, every id decodes to
    "<id>", so a response's text spells out exactly which tokens the worker produced."""

    vocab_size = 1024

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


@dataclass
class Submitted:
    namespace: object
    token_ids: list[int]
    sampling: SamplingParams
    stream: RequestStream


@dataclass
class ScriptedDaemon:
    """Answers every request with `output` (token ids) in frames of `frame` tokens, honouring
    max_tokens, then finishes with `finish`. `refuse` makes submit raise; `fail_after` makes the stream
    fail with RequestFailed after that many frames; `hold` keeps the stream open after the output."""

    output: list[int] = field(default_factory=lambda: list(b"Hello world"))
    frame: int = 3
    finish: FinishReason = FinishReason.STOP
    num_workers: int = 1
    cached_tokens: int = 0
    max_context_len: int = 4096
    draining: bool = False
    refuse: Exception | None = None
    fail_after: int | None = None
    hold: bool = False
    num_warming: int = 0  # the first num_warming workers report ready False
    submitted: list[Submitted] = field(default_factory=list)
    aborted: list[bytes] = field(default_factory=list)

    def workers_info(self) -> list[dict[str, object]]:
        return [{"worker_id": i, "ready": i >= self.num_warming} for i in range(self.num_workers)]

    async def submit(
        self, ns: object, token_ids: list[int], sampling: SamplingParams, *, request_id: bytes | None = None
    ) -> RequestStream:
        if self.refuse is not None:
            raise self.refuse
        rid = request_id or b"\0" * 16
        holder: list[RequestStream] = []

        def on_abort() -> None:
            self.aborted.append(rid)
            holder[0]._push(StreamEvent([], FinishReason.ABORT))

        stream = RequestStream(rid, len(token_ids), on_abort)
        holder.append(stream)
        self.submitted.append(Submitted(ns, list(token_ids), sampling, stream))
        asyncio.get_running_loop().create_task(self._play(stream, sampling, list(token_ids)))
        return stream

    async def _play(self, stream: RequestStream, sampling: SamplingParams, prompt: list[int]) -> None:
        await asyncio.sleep(0)
        stream._mark_dispatched(self.cached_tokens)
        if sampling.prompt_logprobs >= 0:
            stream._push(StreamEvent([], prompt_logprobs=fake_logprobs(prompt[1:], sampling.prompt_logprobs)))
        out = self.output[: sampling.max_tokens]
        frames = [out[i : i + self.frame] for i in range(0, len(out), self.frame)]
        for i, ids in enumerate(frames):
            if self.fail_after is not None and i == self.fail_after:
                stream._fail(RequestFailed("worker crashed"))
                return
            await asyncio.sleep(0)
            stream._push(StreamEvent(ids, logprobs=fake_logprobs(ids, sampling.logprobs)))
        if self.hold:
            return
        reason = FinishReason.LENGTH if len(out) == sampling.max_tokens < len(self.output) else self.finish
        stream._push(StreamEvent([], reason))


MODEL = "tiny-model"


async def start_client(daemon: ScriptedDaemon, **kwargs: Any) -> TestClient:
    """The real HTTP app on a test server, over `daemon` and the byte tokenizer (kwargs: the app's)."""
    app = build_http_app(daemon, ByteTokenizer(), model_name=MODEL, metrics=StaticMetrics(), **kwargs)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


def sse_events(body: str) -> list[Any]:
    """A server-sent-events body as its JSON payloads, "[DONE]" kept as the string."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]


def fake_logprobs(ids: list[int], k: int) -> tuple[tuple[float, list[int], list[float]], ...]:
    """What ScriptedDaemon streams when logprobs are asked (k >= 0): token t has log-probability -t/100,
    and its k alternatives are t, t+1, ... with -t/100, -(t+1)/100, ..."""
    if k < 0:
        return ()
    return tuple((-t / 100, [t + j for j in range(k)], [-(t + j) / 100 for j in range(k)]) for t in ids)


class StaticMetrics:
    def render(self) -> tuple[bytes, str]:
        return b"radixkv_up 1\n", "text/plain; version=0.0.4; charset=utf-8"
