"""response_format (OpenAI) and structured_outputs (vLLM) -> one StructuredOutput; shapes refused with a
400 naming the field; shared.grammar's check of what compiles."""

from __future__ import annotations

import json

import pytest

from cachemgr.http.errors import APIError
from cachemgr.http.parse import parse_chat, parse_completion
from cachemgr.http.structured import ANY_JSON_OBJECT
from shared.grammar import error_text, structured_error
from shared.protocol import StructuredOutput

CHAT = [{"role": "user", "content": "x"}]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def _chat(**fields: object) -> StructuredOutput | None:
    return parse_chat({"messages": CHAT, **fields}).params.structured


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, ANY_JSON_OBJECT),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}},
            StructuredOutput("json_schema", json.dumps(SCHEMA)),
        ),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput("json_schema", json.dumps(SCHEMA))),
        (
            {"structured_outputs": {"json": json.dumps(SCHEMA)}},
            StructuredOutput("json_schema", json.dumps(SCHEMA)),
        ),
        ({"structured_outputs": {"json_object": True}}, ANY_JSON_OBJECT),
        ({"structured_outputs": {"regex": r"\d+"}}, StructuredOutput("regex", r"\d+")),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, StructuredOutput("ebnf", 'root ::= "a"')),
        (
            {"structured_outputs": {"choice": ["yes", 'say "no"']}},
            StructuredOutput("ebnf", 'root ::= "yes" | "say \\"no\\""'),
        ),
    ],
)
def test_both_spellings_map_to_one_structured_output(fields: dict, expected: object) -> None:
    assert _chat(**fields) == expected
    # completions read the same fields, and the sampling parameters carry the result
    params = parse_completion({"prompt": "x", **fields}).params
    assert params.structured == expected and params.sampling(8).structured == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "schema"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"regex": 3}}, "structured_outputs.regex"),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
        ),
    ],
)
def test_bad_shapes_are_refused_naming_the_field(fields: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        _chat(**fields)
    assert info.value.status == 400 and info.value.param is not None and param in info.value.param


def test_structured_output_conflicts_are_caught() -> None:
    with pytest.raises(APIError) as both:
        _chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice="required",
            response_format={"type": "json_object"},
        )
    assert both.value.param == "tool_choice"
    params = parse_chat(
        {"messages": CHAT, "min_tokens": 2, "response_format": {"type": "json_object"}}
    ).params
    with pytest.raises(APIError) as conflict:
        params.sampling(8)
    assert conflict.value.param == "min_tokens"


def test_structured_error_says_what_does_not_compile() -> None:
    assert structured_error(StructuredOutput("json_schema", json.dumps(SCHEMA))) is None
    assert structured_error(StructuredOutput("regex", r"[a-z]+@[a-z]+\.com")) is None
    assert structured_error(StructuredOutput("ebnf", 'root ::= "a" | "b"')) is None
    bad_type = structured_error(StructuredOutput("json_schema", '{"type": "integr"}'))
    assert bad_type is not None and bad_type.startswith("invalid json_schema:") and "integr" in bad_type
    bad_regex = structured_error(StructuredOutput("regex", "(ab"))
    assert bad_regex is not None and "parenthesis" in bad_regex and ".cc" not in bad_regex
    assert structured_error(StructuredOutput("ebnf", "root ::= ")) is not None
    assert error_text(RuntimeError("[07:34:26] /project/cpp/x.cc:83: Bad thing\nmore")) == "Bad thing more"
