"""Side by side, in one run: the issue-2 anchor workload through our PrefixCache and SGLang's RadixCache.

Alternates ``bench.tree_bench`` (this environment) and ``bench.sglang_tree_bench`` (an environment with
SGLang installed, given by ``--sglang-python``), one whole workload per process, ``--rounds`` times each,
every process pinned to the same CPU when ``taskset`` exists, so both see the same machine state. Reports
per operation the median over rounds of each run's mean and p50, and SGLang / ours.

    python -m bench.tree_vs_sglang --sglang-python /path/to/venv/bin/python [--rounds 5] [--policy lfru]
        [--cpu 1] [--out bench/results/tree_vs_sglang.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OPS = ("match", "commit", "lock_release", "evict")


def run_one(python: str, module: str, extra: list[str], cpu: int | None) -> dict[str, object]:
    cmd = [python, "-m", module, "--repeats", "1", "--json", *extra]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sglang-python", required=True, help="python of an environment with sglang")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--policy", default="lru", help="our policy (SGLang runs its default, lru)")
    parser.add_argument("--cpu", type=int, default=1, help="CPU to pin every run to (-1: no pinning)")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args(argv)
    cpu = None if args.cpu < 0 else args.cpu
    ours: list[dict[str, object]] = []
    theirs: list[dict[str, object]] = []
    for i in range(args.rounds):
        ours.append(
            run_one(sys.executable, "bench.tree_bench", ["--skip-scaling", "--policy", args.policy], cpu)
        )
        theirs.append(run_one(args.sglang_python, "bench.sglang_tree_bench", [], cpu))
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
    result: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        "python": platform.python_version(),
        "rounds": args.rounds,
        "pinned_cpu": cpu,
        "policy": args.policy,
        "hit_rate": {"ours": ours[0]["hit_rate"], "sglang": theirs[0]["hit_rate"]},
    }
    print(f"{'op':13s} {'ours mean/p50 us':>18s} {'sglang mean/p50 us':>20s} {'speedup mean/p50':>18s}")
    for op in OPS:
        row: dict[str, float] = {}
        for key in ("mean_us", "p50_us"):
            row[f"ours_{key}"] = float(np.median([r[op][key] for r in ours]))  # type: ignore[index]
            row[f"sglang_{key}"] = float(np.median([r[op][key] for r in theirs]))  # type: ignore[index]
            row[f"speedup_{key.removesuffix('_us')}"] = round(row[f"sglang_{key}"] / row[f"ours_{key}"], 2)
        result[op] = row
        print(f"{op:13s} {row['ours_mean_us']:8.2f} / {row['ours_p50_us']:7.2f} "
              f"{row['sglang_mean_us']:10.2f} / {row['sglang_p50_us']:7.2f} "
              f"{row['speedup_mean']:8.2f}x / {row['speedup_p50']:5.2f}x")  # fmt: skip
    print(f"hit rate: ours {result['hit_rate']['ours']}, sglang {result['hit_rate']['sglang']}")  # type: ignore[index]
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
