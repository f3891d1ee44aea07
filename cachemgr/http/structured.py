"""The structured-output fields of a request body -> one shared.protocol.StructuredOutput (or None).

Two spellings, either endpoint, at most one per request::

    "response_format": {"type": "text"}                                  (OpenAI) nothing
                       {"type": "json_object"}                                    any JSON object
                       {"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}
    "structured_outputs": {"json": {...} or "<schema as JSON text>"}     (vLLM)   that schema
                          {"json_object": true}                                   any JSON object
                          {"regex": "..."}                                        a regular expression
                          {"choice": ["yes", "no", ...]}                          one of the strings
                          {"grammar": "root ::= ..."}                             an EBNF grammar

Only the shape is checked here; whether the schema, regex or grammar compiles is checked by
shared.grammar before the request is accepted (cachemgr.http.app).
"""

from __future__ import annotations

import json
from typing import Any

from cachemgr.http.errors import bad_request
from shared.protocol import StructuredOutput

ANY_JSON_OBJECT = StructuredOutput("json_schema", '{"type": "object"}')
_VLLM_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def parse_structured(body: dict[str, Any]) -> StructuredOutput | None:
    """The request's structured output, None for free text. APIError 400 naming the field otherwise."""
    from_openai = _response_format(body.get("response_format"))
    from_vllm = _structured_outputs(body.get("structured_outputs"))
    if from_openai is not None and from_vllm is not None:
        raise bad_request("Send response_format or structured_outputs, not both.", param="structured_outputs")
    return from_openai or from_vllm


def _response_format(value: Any) -> StructuredOutput | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_JSON_OBJECT
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request(
                "response_format.json_schema must be an object with a 'schema'", param="response_format"
            )
        return _schema(spec.get("schema", {}), "response_format.json_schema.schema")
    raise bad_request(
        "response_format.type must be 'text', 'json_object' or 'json_schema'", param="response_format"
    )


def _structured_outputs(value: Any) -> StructuredOutput | None:
    if value is None:
        return None
    given = [key for key in _VLLM_KEYS if isinstance(value, dict) and value.get(key) is not None]
    if not isinstance(value, dict) or len(given) != 1:
        raise bad_request(
            f"structured_outputs must be an object with exactly one of {', '.join(_VLLM_KEYS)}",
            param="structured_outputs",
        )
    key = given[0]
    param = f"structured_outputs.{key}"
    spec = value[key]
    if key == "json":
        return _schema(spec, param)
    if key == "json_object":
        if spec is not True:
            raise bad_request(f"{param} must be true", param=param)
        return ANY_JSON_OBJECT
    if key == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
            raise bad_request(f"{param} must be a non-empty array of non-empty strings", param=param)
        # EBNF string literals take JSON's escapes: every choice is matched exactly.
        return StructuredOutput(
            "ebnf", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec)
        )
    if not isinstance(spec, str) or not spec:
        raise bad_request(f"{param} must be a non-empty string", param=param)
    return StructuredOutput("regex" if key == "regex" else "ebnf", spec)


def _schema(schema: Any, param: str) -> StructuredOutput:
    """A JSON schema given as an object (or as its JSON text, vLLM's other spelling)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise bad_request(f"{param} is not valid JSON", param=param) from None
    if not isinstance(schema, dict):
        raise bad_request(f"{param} must be a JSON schema object", param=param)
    return StructuredOutput("json_schema", json.dumps(schema, ensure_ascii=False))
