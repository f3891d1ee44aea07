"""Tool calling: `tools` / `tool_choice` parsed and checked, the constraint "required" and a named
function put on the output, calls read from the formats Llama-family models write, and the response
shapes (message.tool_calls, streamed deltas) through the real app over a scripted daemon."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import TestClient

from cachemgr.http.errors import APIError
from cachemgr.http.parse import parse_chat
from cachemgr.http.tools import ToolUse, parse_tools
from shared.grammar import structured_error
from tests.http.doubles import ScriptedDaemon, sse_events

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
CHAT = [{"role": "user", "content": "Weather in Paris?"}]


def _tools(**fields: object) -> ToolUse | None:
    return parse_tools({"tools": [WEATHER, TIME], **fields})


def test_tool_choice_forms() -> None:
    assert parse_tools({"messages": CHAT}) is None
    assert parse_tools({"tools": [], "tool_choice": "none"}) is None
    auto = _tools()
    assert auto is not None and (auto.choice, auto.function, auto.parallel) == ("auto", None, True)
    assert auto.tools[0] == WEATHER and auto.structured() is None and auto.reads_calls
    none = _tools(tool_choice="none")
    assert none is not None and not none.reads_calls
    named = _tools(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named is not None and (named.choice, named.function) == ("function", "get_weather")
    single = _tools(tool_choice="required", parallel_tool_calls=False)
    assert single is not None and not single.parallel


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "auto"}, "tool_choice"),  # no tools
        ({"tools": {"a": 1}}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0]"),
        ({"tools": [TIME, TIME]}, "tools"),
        ({"tools": [TIME], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [TIME], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_bad_tools_are_refused_naming_the_field(body: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        parse_tools(body)
    assert (info.value.status, info.value.param) == (400, param)


def test_required_and_named_constrain_the_output_to_calls() -> None:
    required = _tools(tool_choice="required")
    named = _tools(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert required is not None and named is not None
    array = json.loads(required.structured().spec)  # type: ignore[union-attr]
    assert array["type"] == "array" and array["minItems"] == 1 and "maxItems" not in array
    assert [c["properties"]["name"]["const"] for c in array["items"]["anyOf"]] == ["get_weather", "get_time"]
    assert json.loads(named.structured().spec) == WEATHER["function"]["parameters"]  # type: ignore[union-attr]
    for use in (required, named):
        assert structured_error(use.structured()) is None  # type: ignore[arg-type]
    params = parse_chat({"messages": CHAT, "tools": [WEATHER], "tool_choice": "required"}).params
    assert (
        params.sampling(8).structured
        == parse_tools({"tools": [WEATHER], "tool_choice": "required"}).structured()
    )  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
         [("get_weather", {"city": "Paris"})]),
        ('Let me check.<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
         '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', "Let me check.",
         [("get_time", {}), ("get_weather", {"city": "Oslo"})]),
        ('{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", {"city": "Rome"})]),
        ('<|python_tag|>{"name": "get_time", "parameters": {}}', None, [("get_time", {})]),
        ('[{"name": "get_time", "arguments": "{}"}, {"name": "get_weather", "arguments": {"city": "Bern"}}]',
         None, [("get_time", {}), ("get_weather", {"city": "Bern"})]),
        ('{"name": "unknown_tool", "arguments": {}}', '{"name": "unknown_tool", "arguments": {}}', []),
        ('{"city": "Paris"}', '{"city": "Paris"}', []),
        ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
        ("It is sunny.", "It is sunny.", []),
    ],
)  # fmt: skip
def test_calls_are_read_in_the_formats_models_write(text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = _tools().calls_in(text)  # type: ignore[union-attr]
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got_calls)
    assert len({c["id"] for c in got_calls}) == len(got_calls)


def test_one_call_when_parallel_calls_are_off_and_a_named_function_takes_the_whole_output() -> None:
    single = _tools(parallel_tool_calls=False)
    _, calls = single.calls_in(
        '[{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]'
    )  # type: ignore[union-attr]
    assert len(calls) == 1
    named = _tools(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    content, (call,) = named.calls_in(' {"city": "Pa')  # type: ignore[union-attr]
    assert content is None and call["function"] == {"name": "get_weather", "arguments": '{"city": "Pa'}


def test_earlier_tool_calls_and_results_reach_the_template() -> None:
    messages = [
        *CHAT,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    parsed = parse_chat({"messages": messages, "tools": [WEATHER]}).messages
    assert parsed[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert parsed[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}
    bad = [*CHAT, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]
    with pytest.raises(APIError) as info:
        parse_chat({"messages": bad})
    assert info.value.param == "messages[1].tool_calls[0]"


async def test_a_call_answer_through_the_app(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.output = list(b'<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    body = {"messages": CHAT, "tools": [WEATHER, TIME]}
    reply = await (await client.post("/v1/chat/completions", json=body)).json()
    (choice,) = reply["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert daemon.submitted[0].token_ids[: len(b"<tools>get_weather,get_time\n")] == list(
        b"<tools>get_weather,get_time\n"
    )  # the template saw the tools
    assert reply["usage"]["completion_tokens"] == len(daemon.output)

    events = sse_events(
        await (await client.post("/v1/chat/completions", json={**body, "stream": True})).text()
    )
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in events[:-1]]
    assert deltas[0] == ({"role": "assistant", "content": ""}, None)
    ((streamed, none), (last, reason)) = deltas[1:]
    assert none is None and last == {} and reason == "tool_calls"
    (delta_call,) = streamed["tool_calls"]
    assert delta_call["index"] == 0 and delta_call["function"] == call["function"]


async def test_plain_text_answers_still_stream_with_tools(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.output = list(b"  It is sunny in Paris.")
    body = {"messages": CHAT, "tools": [WEATHER], "stream": True}
    events = sse_events(await (await client.post("/v1/chat/completions", json=body)).text())
    deltas = [c["choices"][0]["delta"].get("content") for c in events[1:-2]]
    assert len(deltas) > 2 and "".join(deltas) == "  It is sunny in Paris."  # not held back to the end
    reply = await (await client.post("/v1/chat/completions", json={**body, "stream": False})).json()
    assert reply["choices"][0]["message"] == {
        "role": "assistant",
        "content": "  It is sunny in Paris.",
        "refusal": None,
    }
    assert reply["choices"][0]["finish_reason"] == "stop"


async def test_forced_calls_are_constrained(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.output = list(b'{"city": "Paris"}')
    body = {
        "messages": CHAT,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    reply = await (await client.post("/v1/chat/completions", json=body)).json()
    assert daemon.submitted[0].sampling.structured is not None  # the grammar was put on the output
    (call,) = reply["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert reply["choices"][0]["finish_reason"] == "stop"  # as OpenAI answers a forced function


async def test_text_then_a_call_streams_the_text_and_holds_the_call(
    client: TestClient, daemon: ScriptedDaemon
) -> None:
    """Hermes-style: words, then a <tool_call> block; the 3-byte frames split the tag, whose partial
    start is held back until it is decided."""
    daemon.output = list(b'Let me check. <tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    body = {"messages": CHAT, "tools": [WEATHER, TIME], "stream": True}
    events = sse_events(await (await client.post("/v1/chat/completions", json=body)).text())
    deltas = [c["choices"][0]["delta"] for c in events[1:-1]]
    text = "".join(d.get("content") or "" for d in deltas)
    assert text == "Let me check. " and "<" not in text
    (call,) = next(d["tool_calls"] for d in deltas if "tool_calls" in d)
    assert call["function"] == {"name": "get_time", "arguments": "{}"}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    reply = await (await client.post("/v1/chat/completions", json={**body, "stream": False})).json()
    message = reply["choices"][0]["message"]
    assert (
        message["content"] == "Let me check. " and message["tool_calls"][0]["function"]["name"] == "get_time"
    )

    daemon.output = list(b"<b>Sunny</b> today; a <tool_ca... no, just text.")
    for stream in (True, False):
        reply = await client.post("/v1/chat/completions", json={**body, "stream": stream})
        if stream:
            chunks = sse_events(await reply.text())[1:-1]
            content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            reason = chunks[-1]["choices"][0]["finish_reason"]
        else:
            choice = (await reply.json())["choices"][0]
            content, reason = choice["message"]["content"], choice["finish_reason"]
        assert (content, reason) == ("<b>Sunny</b> today; a <tool_ca... no, just text.", "stop")


async def test_blank_lines_before_a_call_are_not_content(client: TestClient, daemon: ScriptedDaemon) -> None:
    daemon.output = list(b'\n\n {"name": "get_time", "arguments": {}}')
    body = {"messages": CHAT, "tools": [TIME]}
    reply = await (await client.post("/v1/chat/completions", json=body)).json()
    assert reply["choices"][0]["message"]["content"] is None
    events = sse_events(
        await (await client.post("/v1/chat/completions", json={**body, "stream": True})).text()
    )
    assert not any(c["choices"][0]["delta"].get("content") for c in events[1:-1])
    assert [c["choices"][0]["finish_reason"] for c in events[1:-1]][-1] == "tool_calls"
