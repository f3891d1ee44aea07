"""Hit rate against capacity for every policy and the Belady optimum, on several generated traces.

Writes bench/results/replay_hit_rate.json and bench/results/hit_rate_vs_capacity.png.

    python -m bench.plot_hit_rate [--out-dir bench/results] [--sessions 1500] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.replay import BeladyPolicy, infinite_hit_rate, load_trace, replay
from bench.traces import MultiturnConfig, TraceConfig, generate, generate_multiturn
from bench.traces_revisit import RevisitConfig, generate_revisit
from cachemgr.cache import POLICIES

# Four different kinds of traffic (not one generator setting). "held-out" was never used to choose or
# tune a policy: it checks that the choice carries over to traffic mixed differently.
SETTINGS = {
    "chat": {"agent_share": 0.1, "oneoff_share": 0.25, "abandon_prob": 0.2, "think_s_median": 60.0},
    "agents": {"agent_share": 0.6, "oneoff_share": 0.1, "tool_long_prob": 0.15, "zipf_a": 1.5,
               "think_s_median": 20.0},
    "api": {"agent_share": 0.1, "oneoff_share": 0.6, "oneoff_blocks_median": 10.0, "burst_factor": 3.0},
    "held-out": {"agent_share": 0.3, "oneoff_share": 0.35, "abandon_prob": 0.3, "tool_long_prob": 0.1,
                 "think_s_median": 120.0, "burst_factor": 5.0, "num_system_prompts": 80, "zipf_a": 1.0},
}  # fmt: skip
# The regime where LRU collapses (bench.traces.generate_multiturn): 256 concurrent clients whose turns come
# back after every other client's, so a conversation's reuse distance exceeds the cache. Half as many
# sessions as the other families keeps the live working set a similar share of the distinct blocks.
MULTITURN_SETTINGS = {"multiturn": {"sessions_scale": 0.5}}
# Conversations that come back at random (bench.traces_revisit): recency is the only signal, so a policy
# that keeps older conversations over new ones can only lose; here to bound that loss. Five requests per
# session of the other families.
REVISIT_SETTINGS = {"revisit": {"requests_per_session": 5}}
CAPACITY_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)  # of the trace's distinct blocks


def trace_rows(name: str, sessions: int, seed: int) -> list[dict[str, object]]:
    """The requests of family ``name`` (a key of SETTINGS or MULTITURN_SETTINGS)."""
    if name in REVISIT_SETTINGS:
        per = REVISIT_SETTINGS[name]["requests_per_session"]
        return generate_revisit(RevisitConfig(requests=sessions * per, seed=seed))
    if name in MULTITURN_SETTINGS:
        scale = MULTITURN_SETTINGS[name]["sessions_scale"]
        return generate_multiturn(MultiturnConfig(sessions=max(1, round(sessions * scale)), seed=seed))
    return generate(TraceConfig(sessions=sessions, seed=seed, **SETTINGS[name]))  # type: ignore[arg-type]


def _one(job: tuple[str, int, str]) -> tuple[str, int, str, float]:
    path, capacity, policy = job
    requests = load_trace(path)
    chosen = BeladyPolicy(requests) if policy == "belady" else policy
    return path, capacity, policy, replay(requests, capacity, chosen)["hit_rate"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("--sessions", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, meta = [], {}
    for name, overrides in {**SETTINGS, **MULTITURN_SETTINGS, **REVISIT_SETTINGS}.items():
        path = out_dir / f"replay_trace_{name}.jsonl.tmp"
        rows = trace_rows(name, args.sessions, args.seed)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        distinct = len({b for r in rows for b in r["hash_ids"]})  # type: ignore[attr-defined]
        caps = sorted({max(16, int(distinct * f)) for f in CAPACITY_FRACTIONS})
        meta[str(path)] = {"setting": name, "config": overrides, "requests": len(rows), "distinct_blocks": distinct,
                           "infinite_hit_rate": round(infinite_hit_rate(load_trace(str(path))), 4), "capacities": caps}  # fmt: skip
        jobs += [(str(path), c, p) for c in caps for p in [*sorted(POLICIES), "belady"]]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_one, jobs))
    table: dict[str, dict[str, object]] = {}
    for path, capacity, policy, hit in results:
        entry = table.setdefault(meta[path]["setting"], dict(meta[path]))
        entry.setdefault("hit_rate", {}).setdefault(policy, {})[str(capacity)] = round(hit, 4)  # type: ignore[union-attr]
    for path in meta:
        Path(path).unlink()
    (out_dir / "replay_hit_rate.json").write_text(json.dumps(table, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 4), squeeze=False)
    for ax, (name, entry) in zip(axes[0], table.items(), strict=True):
        for policy, points in entry["hit_rate"].items():  # type: ignore[union-attr]
            caps = sorted(int(c) for c in points)
            ax.plot(caps, [points[str(c)] for c in caps], marker="o", label=policy,
                    linestyle="--" if policy == "belady" else "-")  # fmt: skip
        ax.axhline(entry["infinite_hit_rate"], color="grey", linewidth=0.8, label="infinite cache")
        ax.set_xscale("log")
        ax.set_title(f"{name} ({entry['requests']} requests)")
        ax.set_xlabel("capacity (blocks)")
        ax.set_ylabel("prefix hit rate")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "hit_rate_vs_capacity.png", dpi=110)
    for name, entry in table.items():
        print(name, json.dumps(entry["hit_rate"]))


if __name__ == "__main__":
    main()
