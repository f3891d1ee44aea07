"""Human output of the admin CLI with rich. Input is the JSON result the server sent; nothing here talks
to the daemon. Tables and trees are bounded by what the server returned (the tree by max_nodes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cachemgr.admin.tree_view import render_tree


def render(cmd: str, result: Any, console: Console) -> None:
    """Print `result` of admin command `cmd` for a person."""
    _RENDERERS[cmd](result, console)


def _value(value: Any) -> str:
    """A cell's text, markup-escaped: values come from the daemon and may contain brackets."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return escape(json.dumps(value, separators=(",", ":")))
    return escape(str(value))


def _key_value_table(title: str, values: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", justify="right")
    for key, value in values.items():
        table.add_row(key, _value(value))
    return table


def _records_table(title: str, records: list[dict[str, Any]]) -> Table:
    """A table whose columns are the union of the records' keys, in order of first appearance."""
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for record in records:
        table.add_row(*(_value(record[c]) if c in record else "" for c in columns))
    return table


def _render_stats(result: dict[str, Any], console: Console) -> None:
    cache = dict(result["cache"])
    queried = cache.get("tokens_queried", 0)
    if queried:
        cache["hit_rate"] = f"{100.0 * cache.get('tokens_hit', 0) / queried:.1f}%"
    console.print(_key_value_table("cache", cache))
    console.print(_key_value_table("daemon", result["daemon"]))


def _render_records(title: str, empty: str) -> Callable[[list[dict[str, Any]], Console], None]:
    def _render(result: list[dict[str, Any]], console: Console) -> None:
        if not result:
            console.print(empty)
        else:
            console.print(_records_table(title, result))

    return _render


def _render_evict(result: dict[str, Any], console: Console) -> None:
    console.print(f"evicted {result['evicted']} of {result['requested']} requested pages")


def _render_flush(result: dict[str, Any], console: Console) -> None:
    console.print(f"flushed: {result['freed']} pages freed")


def _namespace(result: dict[str, Any]) -> str:
    return escape(result["model"]) + (" (salted)" if result["salted"] else "")


def _render_pin(result: dict[str, Any], console: Console) -> None:
    where = f"of a {result['tokens']}-token prefix in {_namespace(result)}"
    if result["pinned_tokens"]:
        console.print(f"pinned the first {result['pinned_tokens']} tokens {where}")
    else:
        console.print(f"[yellow]nothing pinned[/]: no page {where} is cached")


def _render_unpin(result: dict[str, Any], console: Console) -> None:
    where = f"of a {result['tokens']}-token prefix in {_namespace(result)}"
    if result["unpinned_tokens"]:
        console.print(f"unpinned the first {result['unpinned_tokens']} tokens {where}")
    else:
        console.print(f"[yellow]nothing unpinned[/]: no pin {where}")


def _render_check(result: dict[str, Any], console: Console) -> None:
    if result["healthy"]:
        console.print("[green]ok[/]: page accounting and locks are consistent")
    else:
        console.print(f"[bold red]integrity check failed[/]: {escape(result['message'])}")


_RENDERERS: dict[str, Callable[[Any, Console], None]] = {
    "stats": _render_stats,
    "tree": render_tree,
    "workers": _render_records("workers", "no workers registered"),
    "leases": _render_records("leases", "no live leases"),
    "evict": _render_evict,
    "flush": _render_flush,
    "pin": _render_pin,
    "unpin": _render_unpin,
    "check": _render_check,
}
