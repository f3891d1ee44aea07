from __future__ import annotations

import pytest

from cachemgr.http.errors import APIError
from cachemgr.http.parse import parse_chat, parse_completion
from shared.protocol import SamplingParams


def _error(fn, body) -> tuple[int, str | None, str]:
    with pytest.raises(APIError) as info:
        fn(body)
    return info.value.status, info.value.param, info.value.message


def test_completion_defaults_and_unknown_fields_ignored() -> None:
    req = parse_completion({"prompt": "hi", "frobnicate": 3, "model": "m"})
    assert req.prompt == "hi"
    p = req.params
    assert (p.model, p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == ("m", None, 1.0, 1.0, 0, None)
    assert (p.stop, p.stream, p.include_usage, p.cache_salt, p.user) == ((), False, False, "", None)
    assert p.sampling(16) == SamplingParams(max_tokens=16)


def test_completion_all_fields() -> None:
    req = parse_completion(
        {
            "prompt": [[5, 6, 7]],
            "max_tokens": 9,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 4,
            "seed": 11,
            "stop": "END",
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache_salt": "tenant-a",
            "user": "u1",
            "ignore_eos": True,
            "stop_token_ids": [2],
        }
    )
    assert req.prompt == (5, 6, 7)
    assert req.params.sampling(16) == SamplingParams(
        max_tokens=9,
        temperature=0.0,
        top_p=0.5,
        top_k=4,
        seed=11,
        stop=["END"],
        stop_token_ids=[2],
        ignore_eos=True,
    )
    assert (req.params.stream, req.params.include_usage, req.params.cache_salt, req.params.user) == (
        True,
        True,
        "tenant-a",
        "u1",
    )


def test_include_usage_only_applies_to_streams() -> None:
    assert (
        parse_completion({"prompt": "x", "stream_options": {"include_usage": True}}).params.include_usage
        is False
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": ["a"] * 9, "n": 15}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "max_tokens": "3"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "stop": ["a", 3]}, "stop"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stream_options": []}, "stream_options"),
        ({"prompt": "x", "n": 17}, "n"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 1.5}, "n"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
        ({"prompt": "x", "cache_salt": 7}, "cache_salt"),
        ({"prompt": "x", "model": 7}, "model"),
        ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
        ({"prompt": "x", "presence_penalty": "high"}, "presence_penalty"),
        ({"prompt": "x", "min_tokens": 1.5}, "min_tokens"),
        ({"prompt": "x", "logit_bias": [1, 2]}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"-3": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"3": "up"}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"3": True}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ],
)
def test_completion_bad_fields_name_the_param(body, param) -> None:
    status, got_param, _ = _error(parse_completion, body)
    assert (status, got_param) == (400, param)


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("max_tokens", 0, "max_tokens"),
        ("temperature", -1, "temperature"),
        ("top_p", 0, "top_p"),
        ("top_k", -2, "top_k"),
        ("presence_penalty", 2.5, "presence_penalty"),
        ("frequency_penalty", -2.01, "frequency_penalty"),
        ("repetition_penalty", 0, "repetition_penalty"),
        ("min_p", 1.1, "min_p"),
        ("min_tokens", 17, "min_tokens"),
        ("logit_bias", {"5": 100.5}, "logit_bias"),
    ],
)
def test_out_of_range_sampling_is_400(field, value, param) -> None:
    params = parse_completion({"prompt": "x", field: value}).params
    with pytest.raises(APIError) as info:
        params.sampling(16)
    assert (info.value.status, info.value.param) == (400, param)


def test_chat_messages_flattened_and_max_completion_tokens_preferred() -> None:
    req = parse_chat(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 7,
        }
    )
    assert req.messages == (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    )
    assert req.params.max_tokens == 7


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0]"),
        ({"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, "functions"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
    ],
)
def test_chat_bad_fields(body, param) -> None:
    status, got_param, _ = _error(parse_chat, body)
    assert (status, got_param) == (400, param)


def test_non_object_body() -> None:
    assert _error(parse_chat, [1, 2])[:2] == (400, None)


def test_logprobs_fields_map_to_one_count() -> None:
    chat = [{"role": "user", "content": "x"}]
    assert parse_completion({"prompt": "x"}).params.logprobs == -1
    assert parse_completion({"prompt": "x", "logprobs": 0}).params.logprobs == 0
    assert parse_completion({"prompt": "x", "logprobs": 5}).params.sampling(16).logprobs == 5
    assert parse_chat({"messages": chat}).params.logprobs == -1
    assert parse_chat({"messages": chat, "logprobs": False, "top_logprobs": 0}).params.logprobs == -1
    assert parse_chat({"messages": chat, "logprobs": True}).params.logprobs == 0
    assert parse_chat({"messages": chat, "logprobs": True, "top_logprobs": 3}).params.logprobs == 3


def test_penalties_min_p_logit_bias_and_min_tokens_reach_the_sampling_params() -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "presence_penalty": 0.5,
        "frequency_penalty": -1,
        "repetition_penalty": 1.2,
        "min_p": 0.05,
        "min_tokens": 4,
        "logit_bias": {"50256": -100, "7": 2.5},
    }
    sampling = parse_chat(body).params.sampling(16)
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (
        0.5,
        -1.0,
        1.2,
    )
    assert (sampling.min_p, sampling.min_tokens, sampling.logit_bias) == (0.05, 4, {50256: -100.0, 7: 2.5})
    assert sampling.processes_logits
    defaults = parse_completion(
        {"prompt": "x", "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
    )
    assert defaults.params.sampling(16) == SamplingParams(
        max_tokens=16
    )  # what OpenAI clients send by default
    assert not defaults.params.sampling(16).processes_logits


def test_a_batch_of_prompts_keeps_its_order() -> None:
    req = parse_completion({"prompt": ["one", [5, 6], "three"], "n": 2})
    assert req.prompts == ("one", (5, 6), "three") and req.params.n == 2
    assert parse_completion({"prompt": [[7, 8]]}).prompts == ((7, 8),)  # a batch of one is one prompt
