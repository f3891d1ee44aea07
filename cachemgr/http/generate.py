"""Running one generation for an HTTP request: submit to the daemon, turn its token stream into OpenAI
responses (one JSON body, or server-sent events), and abort the request when the client goes away.

    handler --submit--> daemon --StreamEvent(token_ids, finish_reason)--> TextAssembler --> client
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

from cachemgr.daemon.errors import NoWorkers, Overloaded, PromptTooLarge, RequestFailed, ShuttingDown
from cachemgr.daemon.stream import LogprobEntry, RequestStream
from cachemgr.http.errors import APIError, bad_request, unavailable
from cachemgr.http.shapes import (
    SSE_DONE,
    Choice,
    ResponseShape,
    chat_logprobs,
    completion_logprobs,
    sse_event,
    usage,
)
from cachemgr.http.text import Detokenizer, TextAssembler
from cachemgr.http.tools import CALL_STARTS, CALL_TAG, ToolUse
from shared.protocol import FinishReason, SamplingParams

DISCONNECT_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class Generation:
    """Everything needed to run one request once it has been parsed and tokenized."""

    shape: ResponseShape
    token_ids: np.ndarray  # int32, checked against the vocabulary
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    echo: str | None = None  # completions with echo: the prompt's text, leading every choice
    score_only: bool = False  # echo with max_tokens 0: only the prompt is answered
    tools: ToolUse | None = None  # chat with tools: the output may be tool calls


@dataclass(frozen=True, slots=True)
class _Piece:
    """Text to send, and the finish reason once the output is complete; the tokens the piece came from
    and, with logprobs, their entries (text held back for a stop string still has its tokens here)."""

    text: str
    finish_reason: str | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: tuple[LogprobEntry, ...] = ()
    tool_calls: tuple[dict[str, Any], ...] = ()  # the last piece of an answer that called tools


class _LogprobsFormatter:
    """Turns one choice's token logprobs into the response's objects (chat or completion shape); the
    completion shape's text offsets run on across the pieces of a stream."""

    def __init__(self, chat: bool, token_text: Callable[[int], str]) -> None:
        self.chat = chat
        self.token_text = token_text
        self.offset = 0

    def format(self, ids: list[int], entries: Sequence[LogprobEntry]) -> dict[str, Any] | None:
        if not entries:
            return None
        if self.chat:
            return chat_logprobs(entries, self.token_text, ids)
        body, self.offset = completion_logprobs(entries, self.token_text, ids, self.offset)
        return body


async def submit(daemon: object, namespace: object, gen: Generation, request_id: bytes) -> RequestStream:
    """Hand the request to the daemon, mapping its refusals to HTTP errors (nothing has run yet)."""
    try:
        return await daemon.submit(namespace, gen.token_ids, gen.sampling, request_id=request_id)  # type: ignore[attr-defined]
    except PromptTooLarge as exc:
        raise bad_request(
            str(exc), param="messages" if gen.shape.chat else "prompt", code="context_length_exceeded"
        ) from None
    except ShuttingDown as exc:
        raise unavailable(str(exc), "shutting_down") from None
    except Overloaded as exc:
        raise unavailable(str(exc) or "The server is overloaded; retry later.", "overloaded") from None
    except NoWorkers as exc:
        raise unavailable(str(exc) or "No compute worker is available.", "no_workers") from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def _echo_piece(gen: Generation, prompt_logprobs: tuple[LogprobEntry, ...] | None) -> _Piece:
    """The prompt as the first piece of a choice (echo): its text, its tokens and, when the request
    asked for logprobs, theirs (the first token has none: nothing comes before it)."""
    assert gen.echo is not None
    entries = ((None, [], []), *prompt_logprobs) if prompt_logprobs is not None else ()
    return _Piece(gen.echo, None, [int(t) for t in gen.token_ids], entries)


async def _pieces(
    stream: RequestStream, assembler: TextAssembler, counter: list[int], gen: Generation
) -> AsyncIterator[_Piece]:
    """The request's output as text pieces, after the echoed prompt when asked; the last piece has the
    finish reason. counter[0] counts output tokens. Raises APIError 503 when the daemon failed or aborted
    the request."""
    echo_due = gen.echo is not None
    if echo_due and gen.sampling.prompt_logprobs < 0:
        yield _echo_piece(gen, None)
        echo_due = False
    try:
        async for event in stream:
            if echo_due and (event.prompt_logprobs or event.token_ids or event.finish_reason is not None):
                # The prompt's logprobs come first, in an event of their own.
                yield _echo_piece(gen, event.prompt_logprobs if event.prompt_logprobs else None)
                echo_due = False
                if not event.token_ids and event.finish_reason is None:
                    continue
            if gen.score_only:  # max_tokens 0: the one token the worker generated is not part of it
                if event.finish_reason is FinishReason.ABORT:
                    raise unavailable("The request was aborted by the server.", "request_aborted")
                if event.finish_reason is not None:
                    yield _Piece("", FinishReason.LENGTH.value)
                    return
                continue
            counter[0] += len(event.token_ids)
            text = assembler.push(event.token_ids)
            ids, logprobs = event.token_ids, event.logprobs
            if assembler.stopped:
                # A stop string ended the text before the worker noticed: stop it generating.
                stream.abort()
                yield _Piece(text, FinishReason.STOP.value, ids, logprobs)
                return
            if event.finish_reason is FinishReason.ABORT:
                raise unavailable("The request was aborted by the server.", "request_aborted")
            if event.finish_reason is not None:
                tail = assembler.finish()  # may reveal a stop string in the held-back text
                reason = FinishReason.STOP if assembler.stopped else event.finish_reason
                yield _Piece(text + tail, reason.value, ids, logprobs)
                return
            if text or logprobs:
                yield _Piece(text, None, ids, logprobs)
    except RequestFailed as exc:
        raise unavailable(f"The request failed: {exc}", "request_failed") from None
    raise unavailable("The request ended without a finish reason.", "request_failed")


async def _tool_call_pieces(source: AsyncIterator[_Piece], tools: ToolUse) -> AsyncIterator[_Piece]:
    """The pieces of a chat choice whose answer may be tool calls. tool_choice "auto": text streams as it
    comes, except from where a call may begin (a first non-blank character {, [ or <, or a <tool_call>
    tag later on, a partial tag held back until it is decided): from there the rest is held to the end
    and read for calls. "required" / a named function: the whole answer is held (it is the calls). The
    held part leaves as one last piece with the calls, finish reason "tool_calls" (a named function keeps
    the model's: OpenAI's "stop"), or as text when it holds none."""
    held: list[_Piece] = []  # pieces (or a text tail) not sent yet
    holding = tools.choice != "auto"
    started = False  # "auto": a non-blank character has been sent
    async for piece in source:
        held.append(piece)
        done = piece.finish_reason is not None
        if not holding:
            text = "".join(p.text for p in held)
            start = _call_start(text, started)
            if start is None:  # no call in sight: send what cannot begin one
                cut = len(text) if done else _sendable(text, started)
                if cut or done:
                    yield _merged_piece(held, text[:cut], piece.finish_reason)
                    if done:
                        return
                    started = True
                    held = [_Piece(text[cut:], None)]
                continue
            if text[:start].strip():  # words before the call go now; the call is held
                yield _merged_piece(held, text[:start], None)
                held = [_Piece(text[start:], None)]
            holding = True
        if not done:
            continue
        text = "".join(p.text for p in held)
        content, calls = tools.calls_in(text)
        reason = piece.finish_reason if not calls or tools.choice == "function" else "tool_calls"
        yield _merged_piece(held, (content or "") if calls else text, reason, tuple(calls))
        return


def _merged_piece(
    pieces: Sequence[_Piece],
    text: str,
    finish_reason: str | None,
    tool_calls: tuple[dict[str, Any], ...] = (),
) -> _Piece:
    """One piece of `text` (and `tool_calls`) carrying the tokens and logprobs of `pieces`."""
    ids = [t for p in pieces for t in p.token_ids]
    return _Piece(text, finish_reason, ids, tuple(e for p in pieces for e in p.logprobs), tool_calls)


def _call_start(text: str, started: bool) -> int | None:
    """Where in the unsent text a tool call may begin: its first non-blank character when nothing was
    sent yet and that is {, [ or <; else a <tool_call> tag; None when neither."""
    if not started:
        stripped = text.lstrip()
        if stripped.startswith(CALL_STARTS):
            return len(text) - len(stripped)
    found = text.find(CALL_TAG)
    return found if found >= 0 else None


def _sendable(text: str, started: bool) -> int:
    """How much of the unsent text (with no call in it) can go now: none while it is blank at the start,
    else all but a tail that could begin a <tool_call> tag."""
    if not started and not text.strip():
        return 0
    tail = next(
        (k for k in range(min(len(CALL_TAG) - 1, len(text)), 0, -1) if text.endswith(CALL_TAG[:k])), 0
    )
    return len(text) - tail


async def respond(
    request: web.Request,
    streams: Sequence[RequestStream],
    gens: Sequence[Generation],
    detokenizers: Sequence[Detokenizer],
    token_text: Callable[[int], str],
    n: int = 1,
) -> web.StreamResponse:
    """Produce the HTTP response for submitted requests, one per choice: ``n`` per prompt, prompt-major,
    ``gens[i]`` what stream i runs. Always leaves every daemon request finished or aborted, whatever
    happens to the client connection. ``token_text`` names tokens in logprobs."""
    gen = gens[0]  # the shape, streaming and usage flags are the same for every choice
    counters = [[0] for _ in streams]
    formatters = [_LogprobsFormatter(gen.shape.chat, token_text) for _ in streams]
    pieces = [
        _pieces(stream, TextAssembler(detok, choice.sampling.stop), counter, choice)
        for stream, detok, counter, choice in zip(streams, detokenizers, counters, gens, strict=True)
    ]
    if gen.tools is not None and gen.tools.reads_calls:
        pieces = [_tool_call_pieces(source, gen.tools) for source in pieces]
    firsts = streams[::n]  # each prompt's first choice: its prompt and cached tokens count once
    watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request, streams))
    try:
        if gen.stream:
            return await _respond_stream(request, streams, gen, pieces, counters, formatters, firsts)
        texts: list[list[str]] = [[] for _ in streams]
        finishes = [FinishReason.STOP.value for _ in streams]
        ids: list[list[int]] = [[] for _ in streams]
        entries: list[list[LogprobEntry]] = [[] for _ in streams]
        calls: list[tuple[dict[str, Any], ...]] = [() for _ in streams]
        async for i, piece in _merged(pieces):
            texts[i].append(piece.text)
            ids[i] += piece.token_ids
            entries[i] += piece.logprobs
            calls[i] += piece.tool_calls
            if piece.finish_reason is not None:
                finishes[i] = piece.finish_reason
        choices = [
            Choice(
                "".join(texts[i]) or (None if calls[i] else ""),
                finishes[i],
                formatters[i].format(ids[i], entries[i]),
                calls[i],
            )
            for i in range(len(streams))
        ]
        return web.json_response(gen.shape.full(choices, _usage(firsts, counters)))
    finally:
        watcher.cancel()
        for stream in streams:
            stream.abort()  # no-op when the request already finished


async def _merged(pieces: Sequence[AsyncIterator[_Piece]]) -> AsyncIterator[tuple[int, _Piece]]:
    """(choice index, piece) from every choice's pieces as they come. One choice is iterated directly
    (no task between the daemon and the client); several are pumped by one task each. The first
    APIError of any choice is raised here, and the other pumps are cancelled."""
    if len(pieces) == 1:
        async for piece in pieces[0]:
            yield 0, piece
        return
    queue: asyncio.Queue[tuple[int, _Piece | None, Exception | None]] = asyncio.Queue()

    async def pump(i: int, source: AsyncIterator[_Piece]) -> None:
        try:
            async for piece in source:
                queue.put_nowait((i, piece, None))
        except Exception as exc:  # APIError from _pieces: handed to the consumer
            queue.put_nowait((i, None, exc))
            return
        queue.put_nowait((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, source)) for i, source in enumerate(pieces)]
    try:
        remaining = len(tasks)
        while remaining:
            i, piece, error = await queue.get()
            if error is not None:
                raise error
            if piece is None:
                remaining -= 1
                continue
            yield i, piece
    finally:
        for task in tasks:
            task.cancel()


async def _respond_stream(
    request: web.Request,
    streams: Sequence[RequestStream],
    gen: Generation,
    pieces: Sequence[AsyncIterator[_Piece]],
    counters: list[list[int]],
    formatters: Sequence[_LogprobsFormatter],
    firsts: Sequence[RequestStream],
) -> web.StreamResponse:
    shape = gen.shape
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    with_usage = gen.include_usage
    try:
        if shape.chat:
            for i in range(len(streams)):
                chunk = shape.chunk("", None, index=i, first=True, with_usage=with_usage)
                await response.write(sse_event(chunk))
        try:
            async for i, piece in _merged(pieces):
                if piece.text or piece.logprobs:
                    logprobs = formatters[i].format(piece.token_ids, piece.logprobs)
                    chunk = shape.chunk(piece.text, None, index=i, with_usage=with_usage, logprobs=logprobs)
                    await response.write(sse_event(chunk))
                if piece.tool_calls:
                    chunk = shape.chunk("", None, index=i, with_usage=with_usage, tool_calls=piece.tool_calls)
                    await response.write(sse_event(chunk))
                if piece.finish_reason is not None:
                    chunk = shape.chunk("", piece.finish_reason, index=i, with_usage=with_usage)
                    await response.write(sse_event(chunk))
        except APIError as exc:
            # Headers are gone already: report the failure in-band, the way OpenAI streams errors.
            await response.write(sse_event(exc.body()))
        else:
            if with_usage:
                await response.write(sse_event(shape.usage_chunk(_usage(firsts, counters))))
        await response.write(SSE_DONE)
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        for stream in streams:
            stream.abort()
        raise
    return response


def _usage(firsts: Sequence[RequestStream], counters: list[list[int]]) -> dict[str, int | dict[str, int]]:
    """Each prompt counted once (as OpenAI does for n > 1) through its first choice, the completions of
    every choice, and the cached prompt tokens of each prompt's first choice: what the cache held before
    this request (the other choices reuse the first one's pages as it computes them)."""
    prompt_tokens = sum(first.prompt_len for first in firsts)
    return usage(prompt_tokens, sum(c[0] for c in counters), sum(first.cached_tokens for first in firsts))


async def _watch_disconnect(request: web.Request, streams: Sequence[RequestStream]) -> None:
    """Abort the requests as soon as the client's connection closes, even while no token is due (a
    request queued for pages, or a non-streamed one) — a stream write alone would notice only later."""
    with contextlib.suppress(asyncio.CancelledError):
        while not all(stream.finished for stream in streams):
            transport = request.transport
            if transport is None or transport.is_closing():
                for stream in streams:
                    stream.abort()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)
