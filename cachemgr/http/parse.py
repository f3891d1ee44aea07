"""Request bodies of /v1/completions and /v1/chat/completions -> validated, immutable requests.

Unknown fields are ignored, as OpenAI does. Fields we accept but cannot honour (best_of > 1, the deprecated
functions / function_call) are refused with a 400 naming the field, rather than silently answered
differently. Structured output (response_format, structured_outputs) is read by cachemgr.http.structured,
tools by cachemgr.http.tools.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cachemgr.http.chat_messages import chat_message
from cachemgr.http.errors import bad_request
from cachemgr.http.structured import parse_structured
from cachemgr.http.tools import ToolUse, parse_tools
from shared.protocol import MAX_LOGIT_BIAS_TOKENS, MAX_TOP_LOGPROBS, SamplingParams, StructuredOutput

MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # n: each choice is a request of its own on the workers
MAX_PROMPTS = 64  # a batched completion's prompts
MAX_GENERATIONS = 128  # prompts x n: the daemon requests one HTTP request may start
MAX_CACHE_SALT_CHARS = 256
MAX_TOKEN_ID_PROMPT = 1 << 20  # longer than any context we serve; refused before touching the daemon


@dataclass(frozen=True, slots=True)
class CommonParams:
    """What both endpoints share. `max_tokens` is None when the client sent none."""

    model: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    stream: bool
    include_usage: bool
    cache_salt: str
    user: str | None
    n: int = 1
    logprobs: int = -1  # -1: none; k >= 0: each token's log-probability and its k most likely alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    prompt_logprobs: int = -1  # completions with echo and logprobs: the prompt's logprobs too
    score_only: bool = False  # echo with max_tokens 0: the prompt alone (one token runs, unsent)
    structured: StructuredOutput | None = None  # the output must match it (response_format etc.)
    structured_field: str = "response_format"  # the body field it came from (for error messages)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """SamplingParams for the daemon. Raises APIError 400 for out-of-range values."""
        params = SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_p=self.min_p,
            logit_bias=dict(self.logit_bias),
            min_tokens=self.min_tokens,
            prompt_logprobs=self.prompt_logprobs,
            structured=self.structured,
        )
        try:
            params.validate()
        except ValueError as exc:
            raise bad_request(str(exc), param=str(exc).split(" ", 1)[0].rstrip(":")) from None
        return params


Prompt = str | tuple[int, ...] | np.ndarray


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    # Each prompt: text, or token ids (a tuple from a plain dict body, an int64 ndarray from
    # cachemgr.http.body's fast path). Several prompts (a batch) get n choices each, prompt-major.
    prompts: tuple[Prompt, ...]
    params: CommonParams
    echo: bool = False  # the prompt leads each choice's text (and its logprobs, with logprobs)

    @property
    def prompt(self) -> Prompt:
        """The first (usually the only) prompt."""
        return self.prompts[0]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    # {"role": ..., "content": text} (content flattened to text), plus an assistant's "tool_calls" and a
    # tool message's "tool_call_id", as chat templates read them
    messages: tuple[dict[str, Any], ...]
    params: CommonParams
    tools: ToolUse | None = None


def parse_completion(body: Any) -> CompletionRequest:
    """Validate a /v1/completions body. Raises APIError 400 naming the offending field."""
    _require_object(body)
    _refuse_unsupported(body)
    echo = _opt(body, "echo", bool, False)
    if "prompt" not in body:
        raise bad_request("'prompt' is a required property", param="prompt")
    # logprobs k: the chosen tokens' log-probabilities plus the k most likely at each position
    k = _int_within(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    params = _common(body, "max_tokens", -1 if k is None else k)
    if echo and k is not None:
        params = replace(params, prompt_logprobs=k)
    if echo and params.max_tokens == 0:  # OpenAI's way to score a prompt without generating
        params = replace(params, max_tokens=1, score_only=True)
    prompts = _prompts(body["prompt"])
    if len(prompts) * params.n > MAX_GENERATIONS:
        raise bad_request(
            f"{len(prompts)} prompts x n = {params.n} is more than {MAX_GENERATIONS} generations",
            param="prompt",
        )
    return CompletionRequest(prompts=prompts, params=params, echo=echo)


def parse_chat(body: Any) -> ChatRequest:
    """Validate a /v1/chat/completions body. Raises APIError 400 naming the offending field."""
    _require_object(body)
    _refuse_unsupported(body)
    for name in ("functions", "function_call"):  # the deprecated forms of tools / tool_choice
        if body.get(name) not in (None, []):
            raise bad_request(f"{name} is not supported: use tools and tool_choice", param=name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", param="messages")
    parsed = tuple(chat_message(m, i) for i, m in enumerate(messages))
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = _common(body, max_field, _chat_logprobs(body))
    tools = parse_tools(body)
    forced = tools.structured() if tools is not None else None
    if forced is not None:  # tool_choice "required" or a named function: the output is constrained
        if params.structured is not None:
            raise bad_request(
                "tool_choice 'required' or a named function excludes a response_format", param="tool_choice"
            )
        params = replace(params, structured=forced, structured_field="tools")
    return ChatRequest(messages=parsed, params=params, tools=tools)


def _chat_logprobs(body: dict[str, Any]) -> int:
    """/v1/chat/completions: ``logprobs`` (bool) and ``top_logprobs`` (0-20, only with logprobs)."""
    wanted = _opt(body, "logprobs", bool, False)
    top = _int_within(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not wanted:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    return (top or 0) if wanted else -1


def _require_object(body: Any) -> None:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("best_of") not in (None, 1):
        raise bad_request("Only best_of=1 is supported.", param="best_of")


def _prompts(value: Any) -> tuple[Prompt, ...]:
    """One prompt (text or token ids), or a batch of them (a list of texts / token-id lists, OpenAI's
    batched completions)."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) > MAX_PROMPTS:
            raise bad_request(f"At most {MAX_PROMPTS} prompts per request.", param="prompt")
        return tuple(_prompt(p) for p in value)
    return (_prompt(value),)


def _prompt(value: Any) -> Prompt:
    if isinstance(value, np.ndarray):  # already a flat, non-empty array of integers (body.py)
        if len(value) > MAX_TOKEN_ID_PROMPT:
            raise bad_request("The prompt has too many tokens.", param="prompt")
        return value
    if isinstance(value, str):
        if not value:
            raise bad_request("The prompt must not be empty.", param="prompt")
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        if len(value) > MAX_TOKEN_ID_PROMPT:
            raise bad_request("The prompt has too many tokens.", param="prompt")
        return tuple(value)
    raise bad_request(
        "'prompt' must be a non-empty string or a non-empty array of token ids, or an array of those.",
        param="prompt",
    )


def _common(body: dict[str, Any], max_field: str, logprobs: int) -> CommonParams:
    stream = _opt(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    include_usage = _opt(options or {}, "include_usage", bool, False, param="stream_options.include_usage")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", param="model")
    return CommonParams(
        model=model,
        max_tokens=_opt_int(body, max_field),
        temperature=_opt_float(body, "temperature", 1.0),
        top_p=_opt_float(body, "top_p", 1.0),
        top_k=_opt_int(body, "top_k") or 0,
        seed=_opt_int(body, "seed"),
        stop=_stop(body.get("stop")),
        stop_token_ids=_token_ids(body.get("stop_token_ids"), "stop_token_ids"),
        ignore_eos=_opt(body, "ignore_eos", bool, False),
        stream=stream,
        include_usage=stream and include_usage,
        cache_salt=_cache_salt(body),
        user=_opt(body, "user", str, None),
        n=_int_within(body, "n", 1, MAX_CHOICES) or 1,
        logprobs=logprobs,
        presence_penalty=_opt_float(body, "presence_penalty", 0.0),
        frequency_penalty=_opt_float(body, "frequency_penalty", 0.0),
        repetition_penalty=_opt_float(body, "repetition_penalty", 1.0),
        min_p=_opt_float(body, "min_p", 0.0),
        min_tokens=_opt_int(body, "min_tokens") or 0,
        logit_bias=_logit_bias(body.get("logit_bias")),
        structured=parse_structured(body),
        structured_field="structured_outputs" if "structured_outputs" in body else "response_format",
    )


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: an object from token ids (JSON keys are strings) to numbers. Ranges are
    checked by SamplingParams.validate, the ids against the vocabulary by the app."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad_request("logit_bias must be an object mapping token ids to numbers", param="logit_bias")
    if len(value) > MAX_LOGIT_BIAS_TOKENS:
        raise bad_request(f"logit_bias may hold at most {MAX_LOGIT_BIAS_TOKENS} tokens", param="logit_bias")
    pairs = []
    for key, bias in value.items():
        token = (
            key
            if _is_int(key)
            else int(key)
            if isinstance(key, str) and key.isascii() and key.isdigit()
            else None
        )
        if token is None or isinstance(bias, bool) or not isinstance(bias, (int, float)) or bias != bias:
            raise bad_request(
                f"logit_bias: {key!r} -> {bias!r} is not a token id mapped to a number", param="logit_bias"
            )
        pairs.append((token, float(bias)))
    return tuple(pairs)


def _int_within(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    """An optional integer field in [low, high]; None when absent. APIError 400 naming it otherwise."""
    value = _opt_int(body, name)
    if value is not None and not low <= value <= high:
        raise bad_request(f"{name} must be between {low} and {high}", param=name)
    return value


def _cache_salt(body: dict[str, Any]) -> str:
    # A namespace root keeps its salt while it holds pages: a megabyte salt per cached page would
    # multiply the daemon's memory, so salts are capped (a hex digest or a UUID is far shorter).
    salt = _opt(body, "cache_salt", str, "")
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise bad_request(f"cache_salt must be at most {MAX_CACHE_SALT_CHARS} characters", param="cache_salt")
    return salt


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt(body: dict[str, Any], name: str, kind: type, default: Any, param: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad_request(f"{param or name} must be a {kind.__name__}", param=param or name)
    return value


def _opt_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not -(2**63) <= value < 2**63:
        raise bad_request(f"{name} must be an integer", param=name)
    return value


def _opt_float(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise bad_request(f"{name} must be a number", param=name)
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or len(value) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in value)
    ):
        raise bad_request(
            f"stop must be a non-empty string or at most {MAX_STOP_STRINGS} of them", param="stop"
        )
    return tuple(value)


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_int(t) and t >= 0 for t in value):
        raise bad_request(f"{name} must be an array of token ids", param=name)
    return tuple(value)
