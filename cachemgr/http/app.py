"""The OpenAI-compatible HTTP API of the daemon (aiohttp).

    GET  /health               200 when at least one worker is registered, else 503 (also while draining)
    GET  /metrics              Prometheus text (no prompt content)
    GET  /v1/models            the served model
    POST /v1/completions       prompt (text or token ids) -> text, streamed (SSE) or not
    POST /v1/chat/completions  messages -> chat template -> tokens -> assistant message
    POST /tokenize             a prompt or messages -> the token ids a generation request would use (vLLM)
    POST /detokenize           token ids -> text (vLLM)

Handlers run on the daemon's event loop; tokenizing and chat templating run in the loop's executor.
The app keeps no request state of its own: the daemon owns every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from cachemgr.cache import Namespace
from cachemgr.daemon.stream import RequestStream
from cachemgr.http.auth import AccessPolicy
from cachemgr.http.body import decode_body, decode_plain_body
from cachemgr.http.errors import APIError, bad_request, internal_error, model_not_found
from cachemgr.http.generate import Generation, respond, submit
from cachemgr.http.parse import CommonParams, parse_chat, parse_completion
from cachemgr.http.shapes import ResponseShape
from cachemgr.http.tokens import TokenizerAdapter
from cachemgr.http.tools import ToolUse
from shared.grammar import structured_error
from shared.protocol import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
# Bound of the tokenizer's piece cache (shared.tokenize_cache); 0 turns it off.
DEFAULT_TOKENIZE_CACHE_BYTES = 64 * 1024 * 1024
# OpenAI's default for /v1/completions; chat has no limit there, ours is bounded so a forgotten
# max_tokens can't hold a worker slot for minutes.
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 1024

# The authenticated API key of a request (None when no keys are configured).
API_KEY: web.RequestKey[str | None] = web.RequestKey("api_key")

_TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize"})  # vLLM's paths; they need the API key too

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Api:
    """The handlers, closed over their dependencies (no module globals)."""

    def __init__(
        self, daemon: Any, tokenizer: TokenizerAdapter, model_name: str, metrics: Any, access: AccessPolicy
    ) -> None:
        self.daemon = daemon
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.access = access
        self.created = int(time.time())

    async def health(self, request: web.Request) -> web.Response:
        workers = self.daemon.workers_info()
        num_ready = sum(w["ready"] for w in workers)
        if self.daemon.draining:
            status = "draining"
        elif num_ready:
            status = "ok"
        elif workers:
            status = "starting"  # registered, still warming up: requests wait for them meanwhile
        else:
            status = "no_workers"
        body = {
            "status": status,
            "workers": len(workers),
            "ready_workers": num_ready,
            "model": self.model_name,
        }
        return web.json_response(body, status=200 if status == "ok" else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            raise APIError(404, "Metrics are not enabled.", code="not_found")
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "radixkv"}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model_name:
            raise model_not_found(request.match_info["model"])
        return web.json_response(self._model_card())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_completion(await _json_body(request))
        self._check_model(parsed.params)
        prompts: list[tuple[np.ndarray, str | None]] = []
        for prompt in parsed.prompts:
            if isinstance(prompt, str):
                token_ids = await self._off_loop(self.tokenizer.encode, prompt)
            else:
                token_ids = self.tokenizer.check_ids(prompt, "prompt")
            echo = None
            if parsed.echo:  # the prompt as sent, or the text of its token ids
                echo = (
                    prompt
                    if isinstance(prompt, str)
                    else await self._off_loop(self.tokenizer.decode, token_ids)
                )
            prompts.append((token_ids, echo))
        return await self._generate(request, parsed.params, prompts, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_chat(await _json_body(request))
        self._check_model(parsed.params)
        tools = parsed.tools.tools if parsed.tools is not None else None
        token_ids = await self._off_loop(self.tokenizer.encode_chat, list(parsed.messages), tools)
        return await self._generate(
            request, parsed.params, [(token_ids, None)], chat=True, tools=parsed.tools
        )

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: {"prompt": text} as /v1/completions tokenizes it, or {"messages": [...]}
        (and "tools") as /v1/chat/completions renders and tokenizes them (assistant turn opened)."""
        body = await _json_body(request, decode_plain_body)
        if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
            raise bad_request("Send an object with either 'prompt' (a string) or 'messages'.")
        if body.get("model") not in (None, self.model_name):
            raise model_not_found(str(body["model"]))
        if "messages" in body:
            chat = parse_chat({"messages": body["messages"], "tools": body.get("tools")})
            tools = chat.tools.tools if chat.tools is not None else None
            token_ids = await self._off_loop(self.tokenizer.encode_chat, list(chat.messages), tools)
        elif isinstance(body["prompt"], str) and body["prompt"]:
            token_ids = await self._off_loop(self.tokenizer.encode, body["prompt"])
        else:
            raise bad_request("'prompt' must be a non-empty string", param="prompt")
        limit = self.daemon.max_context_len
        return web.json_response(
            {"count": len(token_ids), "max_model_len": limit, "tokens": token_ids.tolist()}
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
        body = await _json_body(request, decode_plain_body)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise bad_request("'tokens' must be an array of token ids", param="tokens")
        if body.get("model") not in (None, self.model_name):
            raise model_not_found(str(body["model"]))
        token_ids = self.tokenizer.check_ids(tokens, "tokens")
        return web.json_response({"prompt": await self._off_loop(self.tokenizer.decode, token_ids)})

    def _check_model(self, params: CommonParams) -> None:
        # A missing model means "the one you serve", as vLLM does; a wrong one is a 404 like OpenAI's.
        if params.model is not None and params.model != self.model_name:
            raise model_not_found(params.model)

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _generate(
        self,
        request: web.Request,
        params: CommonParams,
        prompts: Sequence[tuple[np.ndarray, str | None]],
        *,
        chat: bool,
        tools: ToolUse | None = None,
    ) -> web.StreamResponse:
        """Submit n choices of every (token ids, echo text) prompt, prompt-major (choice index = prompt x n
        + choice, as OpenAI numbers a batch), and answer them as one response."""
        if any(not len(token_ids) for token_ids, _ in prompts):
            raise bad_request("The prompt is empty after tokenization.", param="prompt")
        self.tokenizer.check_ids(params.stop_token_ids, "stop_token_ids")
        self.tokenizer.check_ids([token for token, _ in params.logit_bias], "logit_bias")
        default_max = DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS
        request_id = uuid.uuid4().bytes
        shape = ResponseShape(
            id=("chatcmpl-" if chat else "cmpl-") + request_id.hex(),
            created=int(time.time()),
            model=self.model_name,
            chat=chat,
        )
        sampling = params.sampling(default_max)
        if sampling.structured is not None:  # compiled off the loop: the first one imports xgrammar
            error = await self._off_loop(structured_error, sampling.structured)
            if error is not None:
                raise bad_request(error, param=params.structured_field)
        namespace = self.daemon_namespace(request[API_KEY], params.cache_salt)
        gens: list[Generation] = []
        streams: list[RequestStream] = []
        try:
            for token_ids, echo in prompts:
                gen = Generation(
                    shape,
                    token_ids,
                    sampling,
                    params.stream,
                    params.include_usage,
                    echo,
                    params.score_only,
                    tools,
                )
                for i in range(params.n):
                    # The n choices share the prompt: the first computes its pages, the others wait for them.
                    choice = gen if i == 0 else replace(gen, sampling=_choice_sampling(gen.sampling, i))
                    rid = request_id if not streams else uuid.uuid4().bytes
                    streams.append(await submit(self.daemon, namespace, choice, rid))
                    gens.append(choice)
        except BaseException:
            for stream in streams:
                stream.abort()
            raise
        detokenizers = [self.tokenizer.detokenizer(gen.token_ids) for gen in gens]
        return await respond(request, streams, gens, detokenizers, self.tokenizer.token_text, params.n)

    def daemon_namespace(self, api_key: str | None, client_salt: str) -> Namespace:
        return Namespace(model=self.model_name, salt=self.access.cache_salt(api_key, client_salt))


def _choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index`` of a seeded request samples with seed + index (wrapped to int64): n different
    answers, each reproducible. Unseeded choices get independent seeds from their workers."""
    if sampling.seed is None:
        return sampling
    return msgspec.structs.replace(sampling, seed=(sampling.seed + index + 2**63) % 2**64 - 2**63)


async def _json_body(request: web.Request, decode: Callable[[bytes], Any] = decode_body) -> Any:
    """The body decoded by `decode`: by default the generation endpoints' decoder, which keeps only the
    fields they read (cachemgr.http.body)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, "The request body is too large.", code="request_too_large") from None
    return decode(raw)


def _error_middleware(
    access: AccessPolicy,
) -> Callable[[web.Request, _Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            # /health and /metrics stay open for probes and scrapers; they carry no prompt content.
            request[API_KEY] = (
                access.authenticate(request.headers.get("Authorization"))
                if request.path.startswith("/v1/") or request.path in _TOKENIZER_PATHS
                else None
            )
            return await handler(request)
        except APIError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return APIError(exc.status, exc.reason, code=exc.reason.lower().replace(" ", "_")).response()
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return internal_error().response()

    return middleware


def build_http_app(
    daemon: Any,
    tokenizer: Any,
    *,
    model_name: str,
    metrics: Any = None,
    api_keys: frozenset[str] = frozenset(),
    salt_from_api_key: bool = False,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    vocab_size: int | None = None,
    tokenize_cache_bytes: int = DEFAULT_TOKENIZE_CACHE_BYTES,
) -> web.Application:
    """The OpenAI-compatible app over `daemon` (the Daemon facade) and `tokenizer` (shared.tokenizer).

    api_keys: when non-empty, /v1/* needs `Authorization: Bearer <key>`. salt_from_api_key: each key
    gets its own cache namespace (see cachemgr.http.auth). vocab_size bounds token-id prompts (default:
    the tokenizer's). tokenize_cache_bytes bounds the cache of tokenized text pieces between special
    tokens (0: tokenize every text whole). Raises ValueError for an inconsistent configuration."""
    if max_request_bytes < 1024:
        raise ValueError("max_request_bytes must be at least 1024")
    if not model_name:
        raise ValueError("model_name must be non-empty")
    access = AccessPolicy(api_keys=frozenset(api_keys), salt_from_api_key=salt_from_api_key)
    tokens = TokenizerAdapter(tokenizer, vocab_size, cache_bytes=tokenize_cache_bytes)
    api = _Api(daemon, tokens, model_name, metrics, access)
    app = web.Application(client_max_size=max_request_bytes, middlewares=[_error_middleware(access)])
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", api.metrics_text)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/v1/models/{model}", api.model)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_post("/tokenize", api.tokenize)
    app.router.add_post("/detokenize", api.detokenize)
    return app
