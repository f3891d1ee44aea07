"""Does mapping the GPU KV pool need shared namespaces on this machine? (docs/deploy.md cites its output)

Run as root on a GPU machine from the repository root:

    python -m tests.deploy.cuda_ipc_namespaces

The parent creates a small pool with shared.pool.create_pool("cuda_ipc") (as the daemon does); one
child per row maps it with shared.pool.map_pool (as a worker does) from inside fresh Linux namespaces
made with `unshare`, writes a marker byte, and a last child reads the markers back. Containers isolate
more than namespaces (cgroup device rules, their own /dev/nvidia* nodes), so a row passing here does not
prove a container without `ipc: host` / `pid: host` works, but a row failing here proves it cannot.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec

# (label, command prefix that runs the child in new namespaces)
VARIANTS: tuple[tuple[str, list[str]], ...] = (
    ("shared namespaces", []),
    ("own pid namespace", ["unshare", "--pid", "--fork", "--mount-proc"]),
    ("own ipc namespace", ["unshare", "--ipc"]),
    ("own network namespace", ["unshare", "--net"]),
    (
        "own pid+ipc+net+mount namespaces",
        ["unshare", "--pid", "--ipc", "--net", "--mount", "--fork", "--mount-proc"],
    ),
)


def run_parent() -> int:
    """Create the pool, run every variant, print one line each. Exit 1 if any child failed."""
    from shared.kv_layout import KVLayout
    from shared.pool import create_pool

    pool = create_pool(KVLayout(2, 8, 16, 2, 64, "float16"), "cuda_ipc", name="nsprobe", device=0)
    failures = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            desc_path = Path(tmp) / "pool.msgpack"
            desc_path.write_bytes(msgspec.msgpack.encode(pool.descriptor()))
            for marker, (label, prefix) in enumerate(VARIANTS, start=1):
                cmd = [*prefix, sys.executable, "-m", __spec__.name, "write", str(desc_path), str(marker)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
                last = (done.stderr.strip().splitlines() or [""])[-1]
                print(f"{label}: exit {done.returncode} {done.stdout.strip()} {last}".rstrip(), flush=True)
                failures += done.returncode != 0
            # The daemon process cannot open its own handle: a child in its namespaces reads back.
            cmd = [sys.executable, "-m", __spec__.name, "read", str(desc_path), str(len(VARIANTS))]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
            print(f"marker bytes read back: {done.stdout.strip()}")
    finally:
        pool.close()
    return 1 if failures else 0


def run_child(mode: str, desc_path: Path, marker: int) -> None:
    """Map the pool described in desc_path; "write": put `marker` at byte offset `marker`; "read":
    print bytes 1..marker."""
    import torch

    from shared.pool import map_pool
    from shared.protocol import PoolDescriptor

    mapped = map_pool(msgspec.msgpack.decode(desc_path.read_bytes(), type=PoolDescriptor))
    raw = mapped.tensor.view(-1).view(torch.uint8)
    if mode == "write":
        raw[marker] = marker
        torch.cuda.synchronize()
        print("mapped and wrote")
    else:
        print(raw[1 : marker + 1].tolist())
    del raw
    mapped.close()


if __name__ == "__main__":
    if sys.argv[1:2] in (["write"], ["read"]):
        run_child(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(run_parent())
