"""The benchmarks still run: each tool once on a tiny setting, its --json contract checked.

Not timing tests (no numbers are asserted beyond sanity): they catch a benchmark that no longer runs
against the current code, e.g. after a settings or API change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_json(*args: str, timeout: float = 120) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_control_bench_json_contract() -> None:
    result = run_json("bench.control_bench", "--json", "--seconds", "0.3", "--workers", "2")
    assert {"p50_us", "p99_us", "msgs_per_s", "baseline", "transport_floor"} <= result.keys()
    assert result["num_msgs"] > 0 and result["baseline"]["num_msgs"] > 0  # type: ignore[index]


def test_tree_bench_json_contract() -> None:
    result = run_json("bench.tree_bench", "--json", "--repeats", "1", "--skip-scaling")
    assert result["hit_rate"] == 0.9224 and result["requests"] == 4096
    for op in ("match", "commit", "lock_release", "evict"):
        assert result[op]["calls"] > 0  # type: ignore[index]


def test_sglang_baseline_runs_where_sglang_is_installed() -> None:
    pytest.importorskip("sglang.srt.mem_cache.radix_cache")
    result = run_json("bench.sglang_tree_bench", "--json", "--repeats", "1")
    assert result["hit_rate"] == 0.9224
