"""The grammar engine behind structured output (xgrammar), shared by the daemon, which checks a request's
StructuredOutput before accepting it, and the workers, which compile it against their vocabulary.

xgrammar is imported on first use: it brings torch and transformers (~3 s), and a daemon that never sees a
structured request never loads it. JSON schemas are compiled without free whitespace (xgrammar's
``any_whitespace=False``): separators are ``", "`` and ``": "``, so a small model cannot pad its answer
with newlines until max_tokens.
"""

from __future__ import annotations

import functools
import re
import threading
from types import ModuleType
from typing import Any

from shared.protocol import StructuredOutput

_lock = threading.Lock()
_module: ModuleType | None = None
# xgrammar's errors start with "[hh:mm:ss] /path/file.cc:123: "; the rest is the message for the user.
_LOCATION = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def xgrammar() -> ModuleType:
    """The xgrammar module (imported once, thread-safely). RuntimeError if it is not installed."""
    global _module
    with _lock:
        if _module is None:
            try:
                import xgrammar as xgr
            except ImportError as exc:  # a broken install: the package is a dependency
                raise RuntimeError(f"structured output needs the xgrammar package: {exc}") from exc
            _module = xgr
        return _module


def grammar_of(structured: StructuredOutput) -> Any:
    """The xgrammar Grammar of `structured`. ValueError with a message for the client if its spec is not
    a valid JSON schema / regular expression / EBNF grammar, or uses what xgrammar does not support."""
    xgr = xgrammar()
    try:
        if structured.kind == "json_schema":
            return xgr.Grammar.from_json_schema(structured.spec, any_whitespace=False)
        if structured.kind == "regex":
            return xgr.Grammar.from_regex(structured.spec)
        if structured.kind == "ebnf":
            return xgr.Grammar.from_ebnf(structured.spec)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"invalid {structured.kind}: {error_text(exc)}") from None
    raise ValueError(f"unknown structured output kind {structured.kind!r}")


def structured_error(structured: StructuredOutput) -> str | None:
    """Why `structured` cannot be compiled (grammar_of's message), or None if it can. Remembers the last
    256 specs it saw: clients resend the same schema with every request."""
    return _error_of(structured.kind, structured.spec)


@functools.lru_cache(maxsize=256)
def _error_of(kind: str, spec: str) -> str | None:
    try:
        grammar_of(StructuredOutput(kind, spec))
    except ValueError as exc:
        return str(exc)
    return None


def error_text(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location, on one line."""
    text = " ".join(str(exc).split("\n")).strip()
    return _LOCATION.sub("", text) or type(exc).__name__
