"""Running one generation for an HTTP request: submit to the daemon, turn its token stream into OpenAI
responses (one JSON body, or server-sent events), and abort the request when the client goes away.

    handler --submit--> daemon --StreamEvent(token_ids, finish_reason)--> TextAssembler --> client
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from aiohttp import web

from cachemgr.daemon.errors import NoWorkers, Overloaded, PromptTooLarge, RequestFailed
from cachemgr.daemon.stream import RequestStream
from cachemgr.http.errors import APIError, bad_request, unavailable
from cachemgr.http.shapes import SSE_DONE, ResponseShape, sse_event, usage
from cachemgr.http.text import Detokenizer, TextAssembler
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


@dataclass(frozen=True, slots=True)
class _Piece:
    """Text to send, and the finish reason once the output is complete."""

    text: str
    finish_reason: str | None


async def submit(daemon: object, namespace: object, gen: Generation, request_id: bytes) -> RequestStream:
    """Hand the request to the daemon, mapping its refusals to HTTP errors (nothing has run yet)."""
    try:
        return await daemon.submit(namespace, gen.token_ids, gen.sampling, request_id=request_id)  # type: ignore[attr-defined]
    except PromptTooLarge as exc:
        raise bad_request(
            str(exc), param="messages" if gen.shape.chat else "prompt", code="context_length_exceeded"
        ) from None
    except Overloaded as exc:
        raise unavailable(str(exc) or "The server is overloaded; retry later.", "overloaded") from None
    except NoWorkers as exc:
        raise unavailable(str(exc) or "No compute worker is available.", "no_workers") from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None


async def _pieces(
    stream: RequestStream, assembler: TextAssembler, counter: list[int]
) -> AsyncIterator[_Piece]:
    """The request's output as text pieces; the last piece has the finish reason. counter[0] counts
    output tokens. Raises APIError 503 when the daemon failed or aborted the request."""
    try:
        async for event in stream:
            counter[0] += len(event.token_ids)
            text = assembler.push(event.token_ids)
            if assembler.stopped:
                # A stop string ended the text before the worker noticed: stop it generating.
                stream.abort()
                yield _Piece(text, FinishReason.STOP.value)
                return
            if event.finish_reason is FinishReason.ABORT:
                raise unavailable("The request was aborted by the server.", "request_aborted")
            if event.finish_reason is not None:
                tail = assembler.finish()  # may reveal a stop string in the held-back text
                reason = FinishReason.STOP if assembler.stopped else event.finish_reason
                yield _Piece(text + tail, reason.value)
                return
            if text:
                yield _Piece(text, None)
    except RequestFailed as exc:
        raise unavailable(f"The request failed: {exc}", "request_failed") from None
    raise unavailable("The request ended without a finish reason.", "request_failed")


async def respond(
    request: web.Request, stream: RequestStream, gen: Generation, detokenizer: Detokenizer
) -> web.StreamResponse:
    """Produce the HTTP response for a submitted request. Always leaves the daemon's request finished or
    aborted, whatever happens to the client connection."""
    assembler = TextAssembler(detokenizer, gen.sampling.stop)
    counter = [0]
    watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request, stream))
    try:
        if gen.stream:
            return await _respond_stream(request, stream, gen, _pieces(stream, assembler, counter), counter)
        texts: list[str] = []
        finish = FinishReason.STOP.value
        async for piece in _pieces(stream, assembler, counter):
            texts.append(piece.text)
            finish = piece.finish_reason or finish
        body = gen.shape.full("".join(texts), finish, _usage(stream, counter[0]))
        return web.json_response(body)
    finally:
        watcher.cancel()
        stream.abort()  # no-op when the request already finished


async def _respond_stream(
    request: web.Request,
    stream: RequestStream,
    gen: Generation,
    pieces: AsyncIterator[_Piece],
    counter: list[int],
) -> web.StreamResponse:
    shape = gen.shape
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    with_usage = gen.include_usage
    try:
        if shape.chat:
            await response.write(sse_event(shape.chunk("", None, first=True, with_usage=with_usage)))
        try:
            async for piece in pieces:
                if piece.text:
                    await response.write(sse_event(shape.chunk(piece.text, None, with_usage=with_usage)))
                if piece.finish_reason is not None:
                    await response.write(
                        sse_event(shape.chunk("", piece.finish_reason, with_usage=with_usage))
                    )
        except APIError as exc:
            # Headers are gone already: report the failure in-band, the way OpenAI streams errors.
            await response.write(sse_event(exc.body()))
        else:
            if with_usage:
                await response.write(sse_event(shape.usage_chunk(_usage(stream, counter[0]))))
        await response.write(SSE_DONE)
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        stream.abort()
        raise
    return response


def _usage(stream: RequestStream, completion_tokens: int) -> dict[str, int | dict[str, int]]:
    return usage(stream.prompt_len, completion_tokens, stream.cached_tokens)


async def _watch_disconnect(request: web.Request, stream: RequestStream) -> None:
    """Abort the request as soon as the client's connection closes, even while no token is due (a
    request queued for pages, or a non-streamed one) — a stream write alone would notice only later."""
    with contextlib.suppress(asyncio.CancelledError):
        while not stream.finished:
            transport = request.transport
            if transport is None or transport.is_closing():
                stream.abort()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)
