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


def test_serve_bench_runs_every_phase_on_cpu(tmp_path: Path) -> None:
    """The full-stack bench (daemon, workers, HTTP) on the tiny random model: all three phases, the 2-worker
    packed and spread stacks, and the report's contract."""
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench.serve_bench", "--device", "cpu", "--shape", "tiny", "--phases", "abc",
            "--prefix-tokens", "256", "--question-tokens", "16", "--cold-reps", "1", "--clients", "4",
            "--rounds", "2", "--new-tokens", "32", "--output-tokens", "4", "--request-rate", "100",
            "--groups", "2", "--followers", "2", "--group-prefix-tokens", "64", "--groups-repeats", "1",
            "--max-running", "4", "--prefill-chunk", "512", "--out", str(out), "--logs-out", str(tmp_path / "logs.tgz"),
            "--temperature", "0.8", "--top-p", "0.9",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {
        "ttft_cached_speedup",
        "forward_cached_speedup",
        "multiturn_throughput_ratio",
        "multiturn_token_hit_rate",
        "two_workers_throughput_ratio",
        "two_workers_every_follower_hit",
        "two_workers_spread_ratio",
    } <= report["targets"].keys()
    assert report["shared_prefix"]["cached_tokens_hot"] == [256] * len(
        report["shared_prefix"]["cached_tokens_hot"]
    )
    assert (
        report["multi_turn"]["cache"]["token_hit_rate"] > 0
        and report["multi_turn"]["no_cache"]["token_hit_rate"] == 0
    )
    for section in ("groups_1_worker", "groups_2_workers", "groups_2_workers_spread"):
        assert report[section]["min_cached_tokens"] == 64  # every follower hit its whole prefix
    assert (
        sum(report["groups_2_workers_spread"]["prefill_tokens_per_worker"])
        == report["groups_2_workers_spread"]["prefill_tokens_ideal"]
    )
    assert (tmp_path / "logs.tgz").stat().st_size > 0 and out.with_suffix(".png").exists()


def test_cold_forward_sums_a_prompts_prefill_chunks() -> None:
    from bench.serve_bench import cold_forward_ms

    steps = [
        (1, 8192, 8192, 0, 22.9),  # a 10,100-token prompt in two chunks: the first returns before the GPU
        (1, 1908, 1908, 8192, 264.8),
        (1, 1, 0, 10100, 7.5),  # its decode step
        (1, 10100, 10100, 0, 280.0),  # one chunk
        (1, 100, 100, 10000, 9.7),  # a cache hit
        (1, 8192, 8192, 0, 20.0),  # a chunk whose rest never ran alone
        (2, 1908, 1908, 8192, 1.0),
    ]
    assert cold_forward_ms(steps, 10100) == [287.7, 280.0]


def test_sampling_bench_runs_on_cpu() -> None:
    from bench.sampling_bench import main

    result = main(["--device", "cpu", "--vocab", "512", "--batch-sizes", "1,4", "--reps", "1"])
    assert set(result["ms_per_step"]) == {
        f"{m}/{b}" for m in ("greedy", "temperature", "top_p", "top_k_top_p", "processing") for b in (1, 4)
    }
