"""Telling a slow worker from a dead one, on the host they share.

Workers map the daemon's pool (shared memory or CUDA IPC), so they always run on the daemon's host. A
worker that stops heartbeating may be dead, or only stalled (swapped out, starved of CPU, stopped). Its
pages must not go to another request while it can still write them, so the daemon asks the kernel:
the pid a worker registers with means something only inside the same pid namespace, which both sides
name by the inode of /proc/self/ns/pid (compose runs every service with ``pid: host`` for this).
"""

from __future__ import annotations

import os


def pid_namespace_id() -> int:
    """This process's pid namespace (an inode number), or 0 where /proc doesn't tell."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def process_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (a killed child its parent has not reaped
    yet is dead: it can write nothing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # exists but unreadable: assume the worst, it may still write
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]  # the field after "(comm)"
    return state not in (b"Z", b"X")
