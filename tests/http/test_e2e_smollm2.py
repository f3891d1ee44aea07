"""End to end on the real stack: `cachemgr up`'s supervisor starts the daemon and 2 workers on the
embedded SmolLM2-135M-Instruct (CPU), and the official openai client talks to it. Outputs are short
(max_tokens 8) to keep this fast."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from cachemgr.launcher import StackConfig, Supervisor, free_port
from shared.default_model import default_model_path

pytestmark = pytest.mark.slow  # starts real processes and loads SmolLM2 twice

KEY = "test-key-a"
# ~500 tokens of system prompt: from the second turn on, the uncached part of a prompt (the new user
# message, the template's markers, the partial last page) is under 10% of it.
SYSTEM = "You are a concise assistant for a bicycle rental shop. " + " ".join(
    f"Rule {i}: bikes returned after {i % 12 + 1} pm cost {i % 5 + 2} euros extra." for i in range(40)
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    tmp = tmp_path_factory.mktemp("e2e")
    config = StackConfig(
        num_workers=2,
        model=str(default_model_path()),
        http_port=free_port(),
        run_dir=tmp / "run",
        log_dir=tmp / "logs",
        ready_timeout_s=240.0,
        daemon_args=(f"--api-keys={KEY}", "--kv-budget=64MiB"),
    )
    supervisor = Supervisor(config)
    supervisor.start()
    try:
        supervisor.wait_ready(min_workers=2)
        yield supervisor
    finally:
        supervisor.stop()
    daemon_pid = supervisor.daemon.proc.pid if supervisor.daemon.proc else 0
    assert [c.name for c in supervisor.children if c.running] == []
    assert not Path(f"/dev/shm/radixkv-{os.getuid()}-{daemon_pid}.kv").exists()
    assert sorted(p.name for p in config.run_dir.iterdir()) == []


@pytest.fixture(scope="module")
def api(stack: Supervisor) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=stack.config.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    yield client
    client.close()


def _model(api: openai.OpenAI) -> str:
    return api.models.list().data[0].id


def test_openai_client_streaming_equals_non_streaming(api: openai.OpenAI) -> None:
    model = _model(api)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = api.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    assert text and full.usage is not None and full.usage.completion_tokens <= 8
    chunks = api.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    completion = api.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.prompt_tokens > 0


def test_logprobs_and_choices_through_the_openai_client(api: openai.OpenAI) -> None:
    """Greedy with logprobs: each chosen token is its position's most likely one, the log-probabilities
    are those of a distribution, and n = 2 greedy choices agree token for token."""
    model = _model(api)
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = api.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, n=2
    )
    assert len(reply.choices) == 2
    first, second = (c.logprobs.content for c in reply.choices)
    assert [e.token for e in first] == [e.token for e in second] and first
    assert "".join(e.token for e in first) == reply.choices[0].message.content
    for entry in first:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == entry.top_logprobs[0].logprob
        assert entry.logprob <= 0.0 and [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
    completion = api.completions.create(
        model=model, prompt="Red, green and", max_tokens=3, temperature=0, logprobs=2
    )
    legacy = completion.choices[0].logprobs
    assert "".join(legacy.tokens) == completion.choices[0].text and len(legacy.top_logprobs) == len(
        legacy.tokens
    )


def test_logit_bias_and_penalties_through_the_openai_client(api: openai.OpenAI) -> None:
    """A +100 bias makes greedy decoding repeat one token; biasing two tokens, a frequency penalty takes
    turns between them once the leader's count outweighs its lead; an id outside the vocabulary is a 400
    naming logit_bias."""
    model = _model(api)

    def tokens(**kwargs: object) -> list[str]:
        reply = api.completions.create(
            model=model, prompt="Red, green and", max_tokens=4, temperature=0, logprobs=0, **kwargs
        )
        return reply.choices[0].logprobs.tokens

    forced = tokens(logit_bias={"1000": 100})
    assert len(forced) == 4 and len(set(forced)) == 1
    pair = {"1000": 100, "1001": 100}
    assert len(set(tokens(logit_bias=pair))) == 1
    assert len(set(tokens(logit_bias=pair, frequency_penalty=2.0, extra_body={"min_p": 0.1}))) == 2
    assert len(tokens(presence_penalty=1.0, extra_body={"repetition_penalty": 1.3, "min_tokens": 4})) == 4
    with pytest.raises(openai.BadRequestError) as outside:
        tokens(logit_bias={"10000000": 1})
    assert outside.value.param == "logit_bias"


def test_structured_output_through_the_openai_client(api: openai.OpenAI) -> None:
    """response_format with a JSON schema (streamed and not: the same text), json_object with n sampled
    choices, vLLM's structured_outputs regex and choice on completions, and what is refused."""
    model = _model(api)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    person = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    reply = api.chat.completions.create(
        model=model, messages=ask, max_tokens=40, temperature=0, response_format=person
    )
    text = reply.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    assert reply.choices[0].finish_reason == "stop"
    stream = api.chat.completions.create(
        model=model, messages=ask, max_tokens=40, temperature=0, response_format=person, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text

    sampled = api.chat.completions.create(
        model=model, messages=ask, max_tokens=60, temperature=1.0, seed=3, n=3,
        response_format={"type": "json_object"},
    )  # fmt: skip
    for choice in sampled.choices:
        assert choice.finish_reason == "length" or isinstance(json.loads(choice.message.content), dict)

    date = api.completions.create(
        model=model, prompt="Today's date:", max_tokens=16, temperature=0.7,
        extra_body={"structured_outputs": {"regex": r"20\d\d-[01]\d-[0-3]\d"}},
    )  # fmt: skip
    assert re.fullmatch(r"20\d\d-[01]\d-[0-3]\d", date.choices[0].text)
    answer = api.completions.create(
        model=model, prompt="Is the sky blue? Answer:", max_tokens=8, temperature=0,
        extra_body={"structured_outputs": {"choice": [" yes", " no"]}},
    )  # fmt: skip
    assert answer.choices[0].text in (" yes", " no") and answer.choices[0].finish_reason == "stop"

    with pytest.raises(openai.BadRequestError) as bad_regex:
        api.completions.create(
            model=model, prompt="x", max_tokens=4, extra_body={"structured_outputs": {"regex": "(ab"}}
        )
    assert bad_regex.value.param == "structured_outputs" and "parenthesis" in bad_regex.value.message
    with pytest.raises(openai.BadRequestError) as conflict:
        api.chat.completions.create(
            model=model, messages=ask, response_format=person, extra_body={"min_tokens": 2}
        )
    assert conflict.value.param == "min_tokens"


def test_tool_calls_through_the_openai_client(api: openai.OpenAI) -> None:
    """A named function and "required" constrain SmolLM2's answer to calls the client parses; "auto"
    (SmolLM2's template does not show tools: it answers in text) still gives a valid answer; the call and
    its result go back in the next turn."""
    model = _model(api)
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = api.chat.completions.create(
        model=model, messages=ask, tools=[weather], max_tokens=30, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and isinstance(
        json.loads(call.function.arguments)["city"], str
    )
    required = api.chat.completions.create(
        model=model, messages=ask, tools=[weather], max_tokens=40, temperature=0, tool_choice="required"
    )
    assert required.choices[0].finish_reason == "tool_calls"
    assert {c.function.name for c in required.choices[0].message.tool_calls} == {"get_weather"}
    auto = api.chat.completions.create(
        model=model, messages=ask, tools=[weather], max_tokens=8, temperature=0
    )
    assert auto.choices[0].message.content or auto.choices[0].message.tool_calls
    follow_up = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    answer = api.chat.completions.create(model=model, messages=follow_up, tools=[weather], max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_echo_with_logprobs_scores_a_text_as_generation_would(api: openai.OpenAI) -> None:
    """The evaluation harnesses' loglikelihood call (echo, logprobs 1, max_tokens 1): the echoed prompt's
    last token scores what the model gave it when it generated that token after the same context."""
    model = _model(api)
    generated = api.completions.create(
        model=model, prompt="Red, green and", max_tokens=1, temperature=0, logprobs=1
    )
    token = generated.choices[0].logprobs.tokens[0]
    value = generated.choices[0].logprobs.token_logprobs[0]
    scored = api.completions.create(
        model=model, prompt="Red, green and" + token, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    choice = scored.choices[0]
    assert choice.text.startswith("Red, green and" + token)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    last_prompt = len(lp.tokens) - 2  # the last one is the generated token
    assert lp.tokens[last_prompt] == token
    assert lp.token_logprobs[last_prompt] == pytest.approx(value, abs=1e-3)
    assert all(v <= 0.0 for v in lp.token_logprobs[1:])
    prompt_only = api.completions.create(
        model=model, prompt="Red, green and" + token, max_tokens=0, logprobs=1, echo=True
    )
    assert (
        prompt_only.choices[0].text == "Red, green and" + token and prompt_only.usage.completion_tokens == 0
    )
    assert prompt_only.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:-1], abs=1e-3)


def test_a_batch_of_prompts_answers_as_each_prompt_alone(api: openai.OpenAI) -> None:
    model = _model(api)
    prompts = ["Red, green and", "One, two,"]
    alone = [
        api.completions.create(model=model, prompt=p, max_tokens=3, temperature=0).choices[0].text
        for p in prompts
    ]
    batch = api.completions.create(model=model, prompt=prompts, max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == alone
    # Scoring (docs/api.md's example): a batch echoed with logprobs scores each prompt as it alone does.
    score = dict(max_tokens=1, temperature=0, logprobs=1, echo=True)
    each = [api.completions.create(model=model, prompt=p, **score).choices[0].logprobs for p in prompts]
    both = [c.logprobs for c in api.completions.create(model=model, prompt=prompts, **score).choices]
    for one, batched in zip(each, both, strict=True):
        assert batched.tokens == one.tokens and batched.token_logprobs[0] is None
        assert batched.token_logprobs[1:] == pytest.approx(one.token_logprobs[1:], abs=1e-3)


def test_five_turn_chat_reuses_the_conversation(api: openai.OpenAI) -> None:
    model = _model(api)
    messages = [{"role": "system", "content": SYSTEM}]
    shares = []
    for question in (
        "Hi!",
        "Can I rent a bike?",
        "How late can I return it?",
        "What does late cost?",
        "Thanks.",
    ):
        messages.append({"role": "user", "content": question})
        reply = api.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
        usage = reply.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        shares.append(usage.prompt_tokens_details.cached_tokens / usage.prompt_tokens)
    assert shares[0] < 0.9
    assert all(share >= 0.9 for share in shares[1:]), shares


def test_cache_salt_isolation(api: openai.OpenAI) -> None:
    model = _model(api)
    prompt = "Bike rental rules: " + " ".join(f"rule {i} says no riding on path {i}." for i in range(6))

    def usage(salt: str) -> tuple[int, int]:
        r = api.completions.create(
            model=model, prompt=prompt, max_tokens=1, temperature=0, extra_body={"cache_salt": salt}
        )
        return r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens

    (n, first), (_, again), (_, other) = usage("tenant-a"), usage("tenant-a"), usage("tenant-b")
    # every full page but the one holding the last prompt token (at least one token is computed)
    assert (first, again, other) == (0, (n - 1) // 16 * 16, 0)
    assert n > 32


def test_error_shapes(stack: Supervisor, api: openai.OpenAI) -> None:
    bad_key = openai.OpenAI(base_url=stack.config.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e401:
        bad_key.models.list()
    assert e401.value.status_code == 401 and e401.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e404:
        api.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e404.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e400:
        api.completions.create(model=_model(api), prompt="x", max_tokens=1, temperature=-1)
    assert e400.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        api.completions.create(model=_model(api), prompt=[5] * 9000, max_tokens=1)
    assert too_long.value.code == "context_length_exceeded"
    bad_key.close()


def test_supervisor_restarts_a_killed_worker(stack: Supervisor, api: openai.OpenAI) -> None:
    victim = stack.workers[0]
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGKILL)
    reply = api.completions.create(model=_model(api), prompt="One, two,", max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens >= 1  # the other worker keeps serving
    deadline = time.monotonic() + 120
    while victim.num_restarts == 0 or stack.health_workers() != 2:
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        stack.poll()
        time.sleep(0.2)
    assert victim.running
