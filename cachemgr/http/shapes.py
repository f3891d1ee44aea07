"""OpenAI response objects, exactly as the official API shapes them (non-streamed and streamed).

Only plain dicts: the handlers serialize them with json. One `ResponseShape` per request knows its id,
creation time and model, so every chunk of a stream repeats them like OpenAI does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cachemgr.daemon.stream import LogprobEntry

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass(frozen=True, slots=True)
class Choice:
    """One finished choice: its text (None: a chat answer that is only tool calls), finish reason,
    logprobs object and tool calls (OpenAI's shape, chat only)."""

    text: str | None
    finish_reason: str
    logprobs: dict[str, Any] | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()


def _message(text: str | None, tool_calls: Sequence[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = list(tool_calls)
    return message


@dataclass(frozen=True, slots=True)
class ResponseShape:
    """Builds the objects of one response. `chat` selects chat.completion vs text_completion shapes."""

    id: str
    created: int
    model: str
    chat: bool

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def full(self, choices: Sequence[Choice], usage_body: dict[str, Any]) -> dict[str, Any]:
        """The whole (non-streamed) response, one choice per Choice, in index order."""
        if self.chat:
            body = self._head("chat.completion")
            body["choices"] = [
                {
                    "index": i,
                    "message": _message(c.text, c.tool_calls),
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ]
        else:
            body = self._head("text_completion")
            body["choices"] = [
                {"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                for i, c in enumerate(choices)
            ]
        body["usage"] = usage_body
        body["system_fingerprint"] = None
        return body

    def chunk(
        self,
        text: str,
        finish_reason: str | None,
        *,
        index: int = 0,
        first: bool = False,
        with_usage: bool = False,
        logprobs: dict[str, Any] | None = None,
        tool_calls: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """One streamed chunk of choice ``index``. The first chat chunk of a choice carries the assistant
        role; with include_usage every chunk has "usage": null until the final usage-only chunk. Tool calls
        go out whole, each with its index among the choice's calls."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason is not None and not text:
                delta = {}
            if tool_calls:
                delta = {"tool_calls": [{"index": j, **call} for j, call in enumerate(tool_calls)]}
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._head("text_completion")
        body["choices"] = [choice]
        body["system_fingerprint"] = None
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage_body: dict[str, Any]) -> dict[str, Any]:
        """The last chunk of a stream with stream_options.include_usage: no choices, only usage."""
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["system_fingerprint"] = None
        body["usage"] = usage_body
        return body


def chat_logprobs(
    entries: Sequence[LogprobEntry], token_text: Callable[[int], str], ids: Sequence[int]
) -> dict[str, Any]:
    """A chat choice's ``logprobs``: per token its text, log-probability, UTF-8 bytes and alternatives."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for token, (logprob, top_ids, top_values) in zip(ids, entries, strict=True):
        entry = item(token, logprob)
        entry["top_logprobs"] = [item(t, v) for t, v in zip(top_ids, top_values, strict=True)]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(
    entries: Sequence[LogprobEntry], token_text: Callable[[int], str], ids: Sequence[int], offset: int
) -> tuple[dict[str, Any], int]:
    """A completion choice's ``logprobs`` (the legacy shape: tokens, token_logprobs, top_logprobs as
    {token: logprob}, text_offset from ``offset`` in the completion's text) and the offset after it."""
    tokens, offsets = [], []
    for token in ids:
        text = token_text(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    top = [
        {token_text(t): v for t, v in zip(top_ids, top_values, strict=True)} if value is not None else None
        for value, top_ids, top_values in entries
    ]
    body = {
        "tokens": tokens,
        "token_logprobs": [e[0] for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }
    return body, offset
