"""`cachemgr admin <command>`: the admin CLI over the daemon's admin socket.

Exit status: 0 on success, 1 when the daemon can't be reached, answers with an error, or `check` finds
the cache's invariant broken; 2 for usage errors (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from cachemgr.admin import render
from cachemgr.admin.client import AdminClient, AdminUnavailable
from cachemgr.admin.protocol import DEFAULT_TREE_NODES, AdminError


def default_run_dir(env: Mapping[str, str]) -> Path:
    """$RADIXKV_RUN_DIR, else /tmp/radixkv-<uid> (the daemon's default too)."""
    return Path(env.get("RADIXKV_RUN_DIR") or f"/tmp/radixkv-{os.getuid()}")


def default_socket_path(env: Mapping[str, str]) -> Path:
    """$RADIXKV_ADMIN_SOCKET, else <run dir>/admin.sock."""
    explicit = env.get("RADIXKV_ADMIN_SOCKET")
    return Path(explicit) if explicit else default_run_dir(env) / "admin.sock"


def _tcp_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _token_ids(value: str) -> list[int]:
    try:
        ids = [int(part) for part in value.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError("token ids must be integers separated by commas or spaces") from None
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given")
    return ids


def _connection_options(env: Mapping[str, str], *, with_defaults: bool) -> argparse.ArgumentParser:
    """The connection options as a parent parser. The command's copy has no defaults (SUPPRESS), so an
    option given before the command (`cachemgr admin --json stats`) is not reset by the command's parser,
    and one given after it (`cachemgr admin stats --json`) wins."""

    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("connection")
    conn.add_argument(
        "--socket",
        type=Path,
        default=default(default_socket_path(env)),
        help="admin Unix socket (env RADIXKV_ADMIN_SOCKET; default <run dir>/admin.sock, run dir = "
        "$RADIXKV_RUN_DIR or /tmp/radixkv-$UID)",
    )
    conn.add_argument(
        "--tcp",
        type=_tcp_address,
        default=default(_tcp_address(env["RADIXKV_ADMIN_TCP"]) if env.get("RADIXKV_ADMIN_TCP") else None),
        metavar="HOST:PORT",
        help="use the daemon's TCP admin listener instead of the socket (env RADIXKV_ADMIN_TCP)",
    )
    conn.add_argument(
        "--token",
        default=default(env.get("RADIXKV_ADMIN_TOKEN")),
        help="token for --tcp (env RADIXKV_ADMIN_TOKEN; prefer the env var: argv is visible to others)",
    )
    conn.add_argument(
        "--timeout", type=float, default=default(30.0), help="seconds to wait for the daemon (30)"
    )
    conn.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the raw result as JSON (for scripts)",
    )
    return common


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    # Connection options go before or after the command (`cachemgr admin --json stats`, `... stats --json`).
    common = _connection_options(env, with_defaults=False)
    parser = argparse.ArgumentParser(
        prog="cachemgr admin",
        description="Inspect and manage a running cachemgr daemon's prefix cache.",
        parents=[_connection_options(env, with_defaults=True)],
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("stats", parents=[common], help="cache and daemon counters")
    tree = sub.add_parser("tree", parents=[common], help="the radix tree, rendered as a tree")
    tree.add_argument(
        "--max-nodes", type=int, default=DEFAULT_TREE_NODES, help=f"nodes to show ({DEFAULT_TREE_NODES})"
    )
    sub.add_parser("workers", parents=[common], help="registered compute workers")
    sub.add_parser("leases", parents=[common], help="live leases (requests holding pages)")
    evict = sub.add_parser("evict", parents=[common], help="evict up to N unlocked, unpinned pages")
    evict.add_argument("pages", type=int, metavar="N")
    sub.add_parser("flush", parents=[common], help="drop every unlocked, unpinned cached page")
    for name, doc in (("pin", "pin a cached prefix (never evicted)"), ("unpin", "undo a pin")):
        pin = sub.add_parser(name, parents=[common], help=doc)
        what = pin.add_mutually_exclusive_group(required=True)
        what.add_argument("text", nargs="?", help="prefix text (tokenized by the daemon)")
        what.add_argument("--file", type=Path, help="read the prefix text from a file ('-': stdin)")
        what.add_argument("--tokens", type=_token_ids, help="token ids, e.g. 1,2,3")
        pin.add_argument("--model", help="namespace model (default: the daemon's model)")
        pin.add_argument("--salt", default="", help="namespace cache salt (default: none)")
    sub.add_parser("check", parents=[common], help="verify the cache's page accounting invariant")
    return parser


def _command_args(ns: argparse.Namespace) -> dict[str, Any]:
    if ns.cmd == "tree":
        return {"max_nodes": ns.max_nodes}
    if ns.cmd == "evict":
        return {"pages": ns.pages}
    if ns.cmd in ("pin", "unpin"):
        args: dict[str, Any] = {"salt": ns.salt}
        if ns.model:
            args["model"] = ns.model
        if ns.tokens is not None:
            args["token_ids"] = ns.tokens
        elif ns.file is not None:
            args["text"] = sys.stdin.read() if str(ns.file) == "-" else ns.file.read_text()
        else:
            args["text"] = ns.text
        return args
    return {}


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one admin command; returns the process exit status."""
    env = os.environ if env is None else env
    ns = build_parser(env).parse_args(argv)
    err = Console(stderr=True, highlight=False)
    try:
        args = _command_args(ns)
        if ns.tcp is not None:
            client = AdminClient(tcp=ns.tcp, token=ns.token, timeout_s=ns.timeout)
        else:
            client = AdminClient(path=ns.socket, timeout_s=ns.timeout)
        with client:
            result = client.call(ns.cmd, **args)
    except AdminUnavailable as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 1
    except AdminError as exc:
        err.print(f"[bold red]error ({exc.code.value}):[/] {escape(exc.message)}")
        return 1
    except (ValueError, OSError) as exc:  # bad --file, missing token, request too large
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 1
    if ns.json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        render.render(ns.cmd, result, Console(highlight=False))
    if ns.cmd == "check" and not result.get("healthy", False):
        return 1
    return 0
