"""The `cachemgr` command: `serve` (the daemon), `admin` (talk to a running daemon), `up` (daemon plus
workers on the embedded model). Subcommands import their code only when used."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: cachemgr {serve,admin,up} [args]

  serve   run the cache-manager daemon (cachemgr serve --help)
  admin   commands for a running daemon: stats, tree, workers, leases, evict, flush, pin, unpin, check
  up      start the daemon and N workers on the embedded model
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        from cachemgr.main import run

        return run(rest)
    if command == "admin":
        from cachemgr.admin.cli import main as admin_main

        return admin_main(rest)
    if command == "up":
        from cachemgr.launcher import main as up_main

        return up_main(rest)
    print(f"cachemgr: unknown command {command!r}\n{USAGE}", end="", file=sys.stderr)
    return 2
