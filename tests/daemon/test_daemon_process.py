"""`python -m cachemgr serve` as a real process: workers register over ipc://, admin commands see them,
a SIGKILLed worker's leases are reclaimed, and SIGTERM removes the shm pool and the sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers.procs import REPO_ROOT, ProcessGroup, wait_for, write_tiny_model


def admin(info: dict, cmd: str) -> object:
    from cachemgr.admin.client import AdminClient

    with AdminClient(path=info["admin_socket"], timeout_s=10) as client:
        return client.call(cmd)


def admin_cli(info: dict, *args: str) -> object:
    out = subprocess.run(
        [sys.executable, "-m", "cachemgr", "admin", *args, "--socket", info["admin_socket"], "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)


def test_daemon_process_lifecycle(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model")
    with ProcessGroup(tmp_path) as procs:
        daemon, info = procs.start_daemon(
            model,
            "--num-pages",
            "32",
            "--page-size",
            "4",
            "--heartbeat-interval",
            "0.1",
            "--heartbeat-timeout",
            "0.6",
        )
        pool_path = Path(info["pool_path"])
        assert (info["model"], info["num_pages"], info["page_size"], info["http"]) == (
            "tiny-llama",
            32,
            4,
            None,
        )
        assert pool_path.exists() and oct(os.stat(info["admin_socket"]).st_mode & 0o777) == "0o600"
        procs.start_worker(info["worker_endpoint"], "a")
        victim = procs.start_worker(info["worker_endpoint"], "b")
        wait_for(lambda: len(admin(info, "workers")) == 2, timeout_s=20)  # type: ignore[arg-type]
        assert sorted(w["name"] for w in admin(info, "workers")) == ["a", "b"]  # type: ignore[union-attr]
        victim.send_signal(signal.SIGKILL)
        wait_for(lambda: len(admin(info, "workers")) == 1, timeout_s=10)  # type: ignore[arg-type]
        admin_cli(info, "check")  # exits non-zero (check=True raises) if the invariant is broken
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
        assert not pool_path.exists()
        assert not Path(info["admin_socket"]).exists()
        assert not (tmp_path / "ready.json").exists()
        shutdown = [e for e in procs.events() if e["event"] == "shutdown"]
        assert [e["worker"] for e in shutdown] == ["a"]
