"""Tool calling on /v1/chat/completions (OpenAI's `tools` and `tool_choice`).

The tools reach the model through its chat template (the `tools` variable Hugging Face templates read;
a template that ignores it leaves the model unaware of them). What happens to the output depends on
`tool_choice`::

    "none"                 text, as without tools
    "auto" (the default)   the model decides; its output is read for calls in the formats Llama-family
                           models are trained on (below); text otherwise
    "required"             the output is constrained (structured output) to a JSON array of calls,
                           [{"name": <one of the tools>, "arguments": {...its parameters}}, ...]
                           (one call when parallel_tool_calls is false)
    {"type": "function", "function": {"name": N}}
                           the output is constrained to N's arguments object

Formats read in "auto": `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen,
SmolLM3), and a whole answer that is one such JSON object or an array of them, optionally after
`<|python_tag|>`, with "parameters" for "arguments" (Llama 3.1-3.3). Only names of the request's tools
count as calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from cachemgr.http.errors import bad_request
from shared.protocol import StructuredOutput

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CALL_TAG = "<tool_call>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
CALL_STARTS = ("{", "[", "<")  # an "auto" answer starting with one of these may be a call: held back


@dataclass(frozen=True, slots=True)
class ToolUse:
    """The request's tools (as the chat template gets them) and what tool_choice asks of the output."""

    tools: tuple[dict[str, Any], ...]
    choice: str  # "none" | "auto" | "required" | "function"
    function: str | None = None  # choice "function": the one to call
    parallel: bool = True

    @property
    def reads_calls(self) -> bool:
        """Whether the output is turned into tool calls (everything but "none")."""
        return self.choice != "none"

    def structured(self) -> StructuredOutput | None:
        """The constraint "required" and a named function put on the output; None for "auto" / "none"."""
        if self.choice == "function":
            return StructuredOutput("json_schema", json.dumps(self._parameters(self.function)))
        if self.choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": self._parameters(name)},
                "required": ["name", "arguments"],
            }
            for name in self.names
        ]
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        array: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
        if not self.parallel:
            array["maxItems"] = 1
        return StructuredOutput("json_schema", json.dumps(array))

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def calls_in(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The answer's text and its tool calls in OpenAI's shape ([] when it made none: the text is
        the whole answer). With calls, the text is what came before them (None when nothing did)."""
        if self.choice == "function":  # the output is the arguments object (cut short at a length finish)
            assert self.function is not None
            return _shaped(None, [(self.function, text.strip())])
        found = _parse(text, set(self.names))
        if found is None:
            return text, []
        before, calls = found
        if not self.parallel:
            calls = calls[:1]
        return _shaped(before, calls)

    def _parameters(self, name: str | None) -> dict[str, Any]:
        tool = next(t for t in self.tools if t["function"]["name"] == name)
        return tool["function"].get("parameters") or {"type": "object"}


def parse_tools(body: dict[str, Any]) -> ToolUse | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` of a chat body; None without tools. APIError 400
    naming the field for anything malformed."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_request(f"tools must be an array of at most {MAX_TOOLS} tools", param="tools")
    parsed = tuple(_tool(t, i) for i, t in enumerate(tools))
    names = [t["function"]["name"] for t in parsed]
    if len(set(names)) != len(names):
        raise bad_request("tools: function names must be unique", param="tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    if choice is None or choice in ("none", "auto", "required"):
        return ToolUse(parsed, choice or "auto", parallel=parallel)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise bad_request(
            "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if name not in names:
        raise bad_request(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return ToolUse(parsed, "function", name, parallel)


def _tool(value: Any, index: int) -> dict[str, Any]:
    param = f"tools[{index}]"
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(function, dict):
        raise bad_request(f"{param} must be {{'type': 'function', 'function': {{...}}}}", param=param)
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_request(f"{param}.function.name must be 1-64 of a-z, A-Z, 0-9, _ and -", param=param)
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{param}.function.description must be a string", param=param)
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(f"{param}.function.parameters must be a JSON schema object", param=param)
    clean = {"name": name}
    if description is not None:
        clean["description"] = description
    if parameters is not None:
        clean["parameters"] = parameters
    return {"type": "function", "function": clean}


def _parse(text: str, names: set[str]) -> tuple[str, list[tuple[str, str]]] | None:
    """(text before the calls, [(name, arguments JSON)]) if the text holds calls of known tools."""
    blocks = _HERMES.findall(text)
    if blocks:
        calls = [_call(_loads(block), names) for block in blocks]
        if calls and all(c is not None for c in calls):
            return text[: text.index(CALL_TAG)], calls  # type: ignore[return-value]
        return None
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :].strip()
    value = _loads(body)
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    if items and all(c is not None for c in calls):
        return "", calls  # type: ignore[return-value]
    return None


def _call(value: Any, names: set[str]) -> tuple[str, str] | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = _loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _shaped(before: str | None, calls: list[tuple[str, str]]) -> tuple[str | None, list[dict[str, Any]]]:
    """The text before the calls (None when blank) and the calls in OpenAI's shape, each with an id."""
    shaped = [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": n, "arguments": a}}
        for n, a in calls
    ]
    return (before if before and before.strip() else None), shaped
