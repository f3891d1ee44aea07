"""`python -m cachemgr.admin <command>`: the admin CLI without the top-level `cachemgr` entry point."""

from __future__ import annotations

import sys

from cachemgr.admin.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
