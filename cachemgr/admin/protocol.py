"""The admin socket's wire format: newline-delimited JSON, one request and one reply per line.

    request:  {"cmd": "evict", "args": {"pages": 8}, "token": "..."}   ("token" only over TCP)
    reply:    {"ok": true, "result": ...}
              {"ok": false, "error": {"code": "bad_args", "message": "..."}}

Both the server and the client import this module; it does no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

import msgspec
import numpy as np

MAX_REQUEST_BYTES = 1024 * 1024  # a pin of a long prompt fits many times over
MAX_PIN_TOKENS = 128 * 1024
DEFAULT_TREE_NODES = 200
MAX_TREE_NODES = 100_000


class ErrorCode(enum.Enum):
    MALFORMED = "malformed"  # not JSON, not an object, missing or mistyped "cmd"
    TOO_LARGE = "too_large"  # a request line over MAX_REQUEST_BYTES (the connection is closed)
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGS = "bad_args"  # arguments of the wrong shape or rejected by the cache (ValueError)
    UNAUTHORIZED = "unauthorized"  # TCP request without the right token (the connection is closed)
    INTERNAL = "internal"  # a bug: logged with its traceback on the daemon side


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cmd: str
    args: dict[str, Any] = {}
    token: str | None = None


# Arguments of each command (validated with msgspec.convert; unknown fields are errors).


class NoArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class TreeArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_nodes: int = DEFAULT_TREE_NODES

    def __post_init__(self) -> None:
        if not 1 <= self.max_nodes <= MAX_TREE_NODES:
            raise ValueError(f"max_nodes must be in [1, {MAX_TREE_NODES}]")


class EvictArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pages: int

    def __post_init__(self) -> None:
        if self.pages < 1:
            raise ValueError("pages must be at least 1")


class PinArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A prefix to pin or unpin: `text` (tokenized by the daemon) or `token_ids`, exactly one."""

    text: str | None = None
    token_ids: list[int] | None = None
    model: str | None = None  # None: the daemon's model
    salt: str = ""

    def __post_init__(self) -> None:
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give exactly one of text or token_ids")
        if self.token_ids is not None:
            if not 1 <= len(self.token_ids) <= MAX_PIN_TOKENS:
                raise ValueError(f"token_ids must hold 1 to {MAX_PIN_TOKENS} ids")
            if any(not 0 <= t < 2**31 for t in self.token_ids):
                raise ValueError("token ids must be in [0, 2**31)")
        if self.text is not None and not self.text:
            raise ValueError("text must not be empty")


COMMAND_ARGS: dict[str, type[msgspec.Struct]] = {
    "stats": NoArgs,
    "tree": TreeArgs,
    "workers": NoArgs,
    "leases": NoArgs,
    "evict": EvictArgs,
    "flush": NoArgs,
    "pin": PinArgs,
    "unpin": PinArgs,
    "check": NoArgs,
}


class AdminError(Exception):
    """An error reply from the server (or one to send back to the client)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


def parse_request(line: bytes) -> Request:
    """Decode one request line. Raises AdminError(MALFORMED) for anything that isn't a request object."""
    try:
        return msgspec.json.decode(line, type=Request)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AdminError(ErrorCode.MALFORMED, str(exc)) from None


def parse_args(cmd: str, args: dict[str, Any]) -> msgspec.Struct:
    """Validate a command's arguments. Raises AdminError(UNKNOWN_COMMAND or BAD_ARGS)."""
    spec = COMMAND_ARGS.get(cmd)
    if spec is None:
        raise AdminError(
            ErrorCode.UNKNOWN_COMMAND, f"unknown command {cmd[:64]!r}; known: {sorted(COMMAND_ARGS)}"
        )
    try:
        return msgspec.convert(args, spec)
    except (msgspec.ValidationError, ValueError) as exc:
        raise AdminError(ErrorCode.BAD_ARGS, f"{cmd}: {exc}") from None


def to_jsonable(value: Any) -> Any:
    """Turn results (dataclasses, msgspec Structs, numpy values, enums, bytes) into plain JSON types."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, msgspec.Struct):
        return {name: to_jsonable(getattr(value, name)) for name in value.__struct_fields__}
    if hasattr(value, "_asdict"):  # NamedTuple
        return to_jsonable(value._asdict())
    raise TypeError(f"cannot send {type(value).__name__} over the admin socket")


def encode_ok(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": to_jsonable(result)}, separators=(",", ":")).encode() + b"\n"


def encode_error(code: ErrorCode, message: str) -> bytes:
    reply = {"ok": False, "error": {"code": code.value, "message": message}}
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


def encode_request(cmd: str, args: dict[str, Any], token: str | None = None) -> bytes:
    request: dict[str, Any] = {"cmd": cmd, "args": args}
    if token is not None:
        request["token"] = token
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"


def decode_reply(line: bytes) -> Any:
    """Return the result of a reply line, or raise AdminError for an error reply or garbage."""
    try:
        reply = json.loads(line)
    except ValueError:
        raise AdminError(ErrorCode.MALFORMED, "the server sent a reply that is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise AdminError(ErrorCode.MALFORMED, "the server sent a reply without an ok field")
    if reply["ok"]:
        return reply.get("result")
    error = reply.get("error") or {}
    try:
        code = ErrorCode(error.get("code"))
    except ValueError:
        code = ErrorCode.INTERNAL
    raise AdminError(code, str(error.get("message", "")))
