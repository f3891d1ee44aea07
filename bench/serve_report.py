"""The serve bench's report: targets (measured, target, ceiling, met), sections carried over from an
earlier report for phases not run, and the PNG."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from bench.random_model import LlamaShape
from bench.serve_stack import weight_bytes


def target(measured: float | None, goal: float, ceiling: float | None = None, higher: bool = True) -> dict:
    met = measured is not None and (measured >= goal if higher else measured <= goal)
    return {"measured": measured, "target": goal, "ceiling": ceiling, "met": met}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def build_report(
    args: argparse.Namespace,
    shape: LlamaShape,
    card: str,
    bw: float | None,
    a,
    b,
    c1,
    c2,
    c2_spread,
    previous,
) -> dict:
    """The JSON report. Sections of phases not run this time (None) come from `previous` (an earlier
    report), each marked with "from": that report's run label, as do their targets."""
    # Streaming reads run at about the copy figure (read + write bytes per second) on H100/H200.
    floor_ms = weight_bytes(shape, read_only=True) / bw * 1e3 if bw else None
    targets: dict = {}
    if a is not None:
        targets["ttft_cached_speedup"] = target(ratio(a["ttft_cold_s"], a["ttft_cached_s"]), 20.0)
        targets["ttft_cached_speedup_text"] = target(
            ratio(a["ttft_cold_text_s"], a["ttft_cached_text_s"]), 20.0
        )
        targets["forward_cached_speedup"] = target(
            ratio(a["forward_cold_ms"], a["forward_cached_ms"]), 40.0, ratio(a["forward_cold_ms"], floor_ms)
        )
    if b is not None:
        # Ceiling: if prefill were all the work, the cache saves at most this factor of prompt tokens.
        targets["multiturn_throughput_ratio"] = target(
            ratio(b["cache"]["total_tokens_per_s"], b.get("no_cache", {}).get("total_tokens_per_s")), 4.0,
            round(1 / (1 - b["hit_rate_ceiling"]), 2),
        )  # fmt: skip
        targets["multiturn_token_hit_rate"] = target(
            b["cache"]["token_hit_rate"], 0.75, b["hit_rate_ceiling"]
        )
    if c1 is not None and c2 is not None:
        targets["two_workers_throughput_ratio"] = target(
            ratio(c2["requests_per_s"], c1["requests_per_s"]), 1.0
        )
        targets["two_workers_every_follower_hit"] = target(
            float(c2["min_cached_tokens"] == c2["prefix_len"]), 1.0
        )
    if c1 is not None and c2_spread is not None:  # the baseline: requests spread over the two workers
        targets["two_workers_spread_ratio"] = target(
            ratio(c2_spread["requests_per_s"], c1["requests_per_s"]), 1.0
        )
    sections = {
        "shared_prefix": a,
        "multi_turn": b,
        "groups_1_worker": c1,
        "groups_2_workers": c2,
        "groups_2_workers_spread": c2_spread,
    }
    if previous is not None:
        label = previous.get("run") or f"{previous['card']}, {previous['date']}"
        for name, value in sections.items():
            if value is None and previous.get(name) is not None:
                sections[name] = {**previous[name], "from": previous[name].get("from", label)}
        for key, value in previous["targets"].items():
            if key not in targets:
                targets[key] = {**value, "from": value.get("from", label)}
    return {
        "run": args.run_label,
        "card": card,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.serve_bench " + " ".join(sys.argv[1:]),
        "shape": {k: getattr(shape, k) for k in shape.__slots__},
        "copy_bandwidth_GBps": round(bw / 1e9, 1) if bw else None,
        "weight_read_floor_ms": round(floor_ms, 3) if floor_ms else None,
        "targets": targets,
        **sections,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = report["shared_prefix"], report["multi_turn"]
    c1, c2 = report["groups_1_worker"], report["groups_2_workers"]
    c2_spread = report.get("groups_2_workers_spread")

    def src(section: dict) -> str:
        return f"\n({section['from']})" if "from" in section else ""

    bars = []
    if a is not None:
        bars += [
            (
                ["cold", "cached"],
                [a["ttft_cold_s"] * 1e3, a["ttft_cached_s"] * 1e3],
                "TTFT ms, token ids" + src(a),
            ),
            (
                ["cold", "cached"],
                [a["ttft_cold_text_s"] * 1e3, a["ttft_cached_text_s"] * 1e3],
                "TTFT ms, text" + src(a),
            ),
            (
                ["cold", "cached"],
                [a["forward_cold_ms"] or 0, a["forward_cached_ms"] or 0],
                "engine step ms" + src(a),
            ),
        ]
    if b is not None:
        bars.append(
            (
                ["no cache", "cache"],
                [b.get("no_cache", {}).get("total_tokens_per_s", 0), b["cache"]["total_tokens_per_s"]],
                "multi-turn tokens/s" + src(b),
            )
        )
    if c1 is not None and c2 is not None:
        labels, values = ["1 worker", "2 workers"], [c1["requests_per_s"], c2["requests_per_s"]]
        if c2_spread is not None:
            labels, values = ["1", "2, packed", "2, spread"], [*values, c2_spread["requests_per_s"]]
        bars.append((labels, values, "shared groups req/s (workers)" + src(c2)))
    fig, axes = plt.subplots(1, len(bars), figsize=(4 * len(bars), 3.8), squeeze=False)
    for ax, (labels, values, title) in zip(axes[0], bars, strict=True):
        ax.bar(labels, values, color=["#999", "#2a7", "#c84"][: len(values)])
        ax.set_title(title, fontsize=9)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.3g}", ha="center", va="bottom")
    fig.suptitle(f"radixkv serve bench, {report['card']}, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
