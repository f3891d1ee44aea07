"""The messages of a /v1/chat/completions body -> the dicts chat templates read.

Each becomes {"role", "content"} with the content flattened to text ("developer" read as "system"); an
assistant turn keeps its "tool_calls" (their arguments parsed from JSON text into objects, as Hugging Face
templates expect them) and a tool message its "tool_call_id".
"""

from __future__ import annotations

import json
from typing import Any

from cachemgr.http.errors import bad_request

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def chat_message(value: Any, index: int) -> dict[str, Any]:
    """messages[index] checked and shaped for the template. APIError 400 naming the field otherwise."""
    param = f"messages[{index}]"
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be an object", param=param)
    role = value.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(f"{param}.role must be one of {sorted(CHAT_ROLES)}", param=f"{param}.role")
    content = value.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        content = _text_parts(content, f"{param}.content")
    if not isinstance(content, str):
        raise bad_request(
            f"{param}.content must be a string or an array of text parts", param=f"{param}.content"
        )
    message: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    if role == "assistant" and value.get("tool_calls"):
        message["tool_calls"] = [
            _past_call(c, f"{param}.tool_calls[{i}]") for i, c in enumerate(value["tool_calls"])
        ]
    if role == "tool" and value.get("tool_call_id") is not None:
        message["tool_call_id"] = _tool_call_id(value, param)
    return message


def _past_call(value: Any, param: str) -> dict[str, Any]:
    """An earlier assistant turn's tool call, as chat templates read it: the arguments as an object (they
    arrive as JSON text; templates serialise them themselves)."""
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise bad_request(
            f"{param} must be {{'function': {{'name': ..., 'arguments': '<JSON>'}}}}", param=param
        )
    try:
        parsed = json.loads(arguments)
    except ValueError:
        raise bad_request(f"{param}.function.arguments is not valid JSON", param=param) from None
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": parsed}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def _text_parts(parts: list[Any], param: str) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"{param}: only text parts are supported", param=param)
        texts.append(part["text"])
    return "".join(texts)


def _tool_call_id(value: dict[str, Any], param: str) -> str:
    call_id = value["tool_call_id"]
    if not isinstance(call_id, str):
        raise bad_request(f"{param}.tool_call_id must be a string", param=f"{param}.tool_call_id")
    return call_id
