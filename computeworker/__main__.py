"""`python -m computeworker` == `computeworker`."""

from __future__ import annotations

import sys

from computeworker.cli import main

sys.exit(main())
