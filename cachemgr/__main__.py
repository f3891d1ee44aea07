"""`python -m cachemgr ...` is the `cachemgr` command."""

from cachemgr.cli import main

raise SystemExit(main())
