"""The machine's own floor for a cross-process round trip: two processes ping-ponging one byte over pipes.

No ZeroMQ, no Python objects beyond the bytes: what waking a blocked process and being woken back costs
on this host. Measured twice: processes free to run on any CPU (the kernel usually puts them on two, so
each hop is a cross-CPU wake-up) and both pinned to one CPU (each hop is a context switch). On a VM whose
idle vCPUs halt, the cross-CPU figure is dominated by the hypervisor's wake-up path; every control-path
round trip (ZeroMQ needs several such hops per direction) pays it.

    python -m bench.wakeup_floor [--seconds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def pipe_round_trip(seconds: float, cpu: int | None = None) -> dict[str, float]:
    """p50 / p99 µs of a one-byte pipe round trip between a parent and a forked child."""
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    previous = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    pid = os.fork()
    if pid == 0:  # child: echo until told to stop
        try:
            while os.read(to_child_r, 1) == b"p":
                os.write(to_parent_w, b"p")
        finally:
            os._exit(0)
    try:
        samples: list[int] = []
        clock = time.perf_counter_ns
        end = clock() + int(seconds * 1e9)
        while True:
            t0 = clock()
            if t0 >= end:
                break
            os.write(to_child_w, b"p")
            os.read(to_parent_r, 1)
            samples.append(clock() - t0)
        os.write(to_child_w, b"q")
        os.waitpid(pid, 0)
    finally:
        os.sched_setaffinity(0, previous)
        for fd in (to_child_r, to_child_w, to_parent_r, to_parent_w):
            os.close(fd)
    us = np.array(samples[len(samples) // 10 :], dtype=np.float64) / 1000.0  # first 10% warm up
    p50, p99 = np.percentile(us, [50, 99])
    return {"p50_us": round(float(p50), 1), "p99_us": round(float(p99), 1)}


def measure(seconds: float) -> dict[str, dict[str, float]]:
    result = {"any_cpu": pipe_round_trip(seconds)}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        result["one_cpu"] = pipe_round_trip(seconds, cpus[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.seconds)))


if __name__ == "__main__":
    main()
