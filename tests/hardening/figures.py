"""Figures the hardening tests measure, for bench/results/hardening.md.

`record` prints one line per figure set and, when RADIXKV_HARDENING_FIGURES names a file, appends it
there as a JSON line. Tests never write into the repository on their own.
"""

from __future__ import annotations

import json
import os
import sys


def record(name: str, **figures: object) -> None:
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print(f"[hardening] {line}", file=sys.stderr)
    path = os.environ.get("RADIXKV_HARDENING_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")
