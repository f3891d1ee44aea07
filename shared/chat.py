"""Chat templates: the model's own Jinja template (from tokenizer_config.json or GGUF metadata) rendered in a
sandbox, with the variables and helpers Hugging Face templates expect (messages, add_generation_prompt,
bos_token, eos_token, raise_exception, strftime_now, tojson).

Templates are data that arrives with a model file, so they run in jinja2's immutable sandbox: they cannot
reach Python internals or mutate the caller's messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]


class ChatTemplateError(ValueError):
    """The template failed to render these messages (it raised, or the messages break its rules)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    # HF templates call tojson on tool schemas; keep non-ASCII text as is, like transformers does
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template. Immutable after construction; `render` is safe to call from any thread."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        if not source.strip():
            raise ValueError("empty chat template")
        # trim_blocks/lstrip_blocks: the whitespace rules every HF chat template is written against
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=Undefined, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"chat template does not compile: {e}") from e
        self.source = source
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text for `messages` (each a mapping with at least "role" and "content").
        Raises ValueError (ChatTemplateError) for malformed messages or when the template rejects them."""
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m:
                raise ChatTemplateError(f"message {i} must be a mapping with a 'role'")
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=list(tools) if tools else None,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, KeyError, IndexError) as e:
            # a template indexing or concatenating a field the messages lack
            raise ChatTemplateError(f"chat template failed: {e}") from e
