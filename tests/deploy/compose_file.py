"""Read compose.yaml the way `docker compose` does, for tests that have no Docker engine.

Supports what our compose.yaml uses: YAML anchors and merge keys (PyYAML resolves them), variable
interpolation (`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `$VAR`,
`$$` for a literal `$`), profiles, and both list and mapping forms of `environment`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = REPO_ROOT / "compose.yaml"
DOTENV_PATH = REPO_ROOT / ".env"

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A `${VAR:?message}` whose variable is unset (compose refuses to start)."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Substitute variables in one string with compose's rules. Raises InterpolationError for a
    required variable that is missing."""

    def substitute(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["bare"]
        value = env.get(name)
        op, arg = m["op"], m["arg"] or ""
        if op is None:
            return value or ""
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return interpolate(arg, env) if unset else str(value)
        if unset:
            raise InterpolationError(f"required variable {name} is missing: {arg}")
        return str(value)

    return _VAR.sub(substitute, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """`interpolate` applied to every string value (not keys, as compose does) of a parsed file."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_raw(path: Path = COMPOSE_PATH) -> dict[str, Any]:
    """The parsed file with anchors and merge keys resolved, variables left as written."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    return data


def read_dotenv(path: Path = DOTENV_PATH) -> dict[str, str]:
    """KEY=VALUE lines of a compose .env file (comments and blank lines skipped); {} if absent."""
    if not path.is_file():
        return {}
    pairs: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: not KEY=VALUE: {line!r}")
            pairs[key.strip()] = value.strip()
    return pairs


def load(env: Mapping[str, str] | None = None, path: Path = COMPOSE_PATH) -> dict[str, Any]:
    """The file as compose sees it with `env` as the shell environment (default: empty, so every
    variable takes its documented default)."""
    return interpolate_tree(load_raw(path), env or {})


def active_services(compose: Mapping[str, Any], profiles: set[str]) -> dict[str, dict[str, Any]]:
    """Services that `docker compose --profile P ... up` starts: those without profiles, plus those
    in one of the given profiles."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if not svc.get("profiles") or profiles & set(svc["profiles"])
    }


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment` as a dict, in either of compose's two forms."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {key: value for key, _, value in pairs}
    return {key: "" if value is None else str(value) for key, value in env.items()}
