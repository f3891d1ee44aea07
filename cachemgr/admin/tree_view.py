"""The `tree` command's rich rendering of a cache dump (cachemgr.cache.types.TreeDump, sent as JSON).

    prefix cache: 5 of 5 nodes        (page size 4 in this example)
    └── SmolLM2-135M-Instruct  (salt 1f0c9a2e) · 6 pages
        ├── [1 2 3 4 5 6 7 8 …]  4 pages at depth 0 · locks 1 · pinned · last access #12
        │   └── … 2 more
        └── [9 9 9 9]  1 page at depth 0 · last access #3

Depth is the node's first page position in the prompt (not a page id); last access is the cache's
logical clock. Every count the server left out (max_nodes) shows as "… N more" under the node that hides them.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

PREVIEW_TOKENS = 8


def render_tree(dump: dict[str, Any], console: Console) -> None:
    """Print a TreeDump (as JSON) as a rich Tree."""
    shown, total = dump["num_nodes_shown"], dump["num_nodes_total"]
    title = f"[bold]prefix cache[/]: {shown} of {total} nodes"
    if dump["truncated"]:
        title += " [yellow](truncated: raise --max-nodes to see more)[/]"
    root = Tree(title)
    if not dump["namespaces"]:
        root.add("[dim](empty)[/]")
    page_size = dump["page_size"]
    for namespace in dump["namespaces"]:
        label = f"[bold cyan]{escape(namespace['model'])}[/]"
        if namespace["salt"]:
            label += f"  (salt {escape(namespace['salt'])})"
        label += f" · {_pages(namespace['num_pages'])}"
        branch = root.add(label)
        _add_children(branch, namespace["children"], namespace["num_hidden_children"], page_size)
    console.print(root)


def _pages(count: int) -> str:
    return f"{count} page" if count == 1 else f"{count} pages"


def _add_children(branch: Tree, children: list[dict[str, Any]], num_hidden: int, page_size: int) -> None:
    for node in children:
        sub = branch.add(_node_label(node, page_size))
        _add_children(sub, node["children"], node["num_hidden_children"], page_size)
    if num_hidden:
        branch.add(f"[dim]… {num_hidden} more[/]")


def _node_label(node: dict[str, Any], page_size: int) -> str:
    preview = node["token_preview"][:PREVIEW_TOKENS]
    first, count = node["depth_pages"], node["num_pages"]
    more = " …" if len(preview) < count * page_size else ""
    tokens = " ".join(str(t) for t in preview) + more
    parts = [f"[green]\\[{tokens}][/]  {_pages(count)} at depth {first}"]
    if node["lock_count"]:
        parts.append(f"[bold]locks {node['lock_count']}[/]")
    if node["pinned"]:
        parts.append("[magenta]pinned[/]")
    parts.append(f"last access #{node['last_access']}")
    return " · ".join(parts)
