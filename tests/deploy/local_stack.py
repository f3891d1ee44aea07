"""Run compose services as local processes, the way their containers would run them.

A service's process gets: the image's ENV (from the Dockerfile stages of its build target and variant),
then the service's `environment:` from compose.yaml, with container paths mapped to local ones. Its
argv is the service's `command:`. Nothing here knows which RADIXKV_* variables exist: that is the
point, the test runs the stack on exactly what compose would give it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.deploy import dockerfile


def image_env(stages: Mapping[str, dockerfile.Stage], target: str, variant: str) -> dict[str, str]:
    """The ENV a container of `--target target --build-arg VARIANT=variant` starts with."""
    env: dict[str, str] = {}
    for stage in reversed(dockerfile.lineage(dict(stages), target, variant)):
        for instruction in stage.all("ENV"):
            for word in shlex.split(instruction.args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def map_paths(env: Mapping[str, str], container_to_local: Mapping[str, Path]) -> dict[str, str]:
    """Replace container paths (exactly, or as a prefix followed by '/') in values with local ones."""
    mapped: dict[str, str] = {}
    for key, value in env.items():
        for container, local in container_to_local.items():
            if value == container or value.startswith(container + "/"):
                value = str(local) + value[len(container) :]
        mapped[key] = value
    return mapped


def host_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any RADIXKV_* (so nothing leaks in from the developer's
    shell), plus `overrides`, with our interpreter's bin directory first on PATH (console scripts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIXKV_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


@dataclass
class Replica:
    """One running "container" of a service."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, grace_s: float) -> int:
        """Wait up to `grace_s` for the exit, then SIGKILL. Returns the exit code."""
        try:
            return self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def stop(self, grace_s: float) -> int:
        """SIGTERM, then SIGKILL after `grace_s` (what `docker stop` does). Returns the exit code."""
        self.terminate()
        return self.wait(grace_s)


def stop_together(replicas: list[Replica], grace_s: float) -> list[int]:
    """SIGTERM all, then wait for each (SIGKILL after the shared grace period), as `docker compose stop`
    stops a service's containers in parallel. Returns the exit codes in order."""
    for replica in replicas:
        replica.terminate()
    deadline = time.monotonic() + grace_s
    return [r.wait(max(0.0, deadline - time.monotonic())) for r in replicas]


def spawn(name: str, command: list[str], env: Mapping[str, str], log_dir: Path) -> Replica:
    """Start `command` (resolved on the env's PATH) with exactly `env`, output to <log_dir>/<name>.log."""
    program = shutil.which(command[0], path=env["PATH"])
    if program is None:
        raise FileNotFoundError(f"{command[0]} is not on PATH")
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([program, *command[1:]], env=dict(env), stdout=log, stderr=subprocess.STDOUT)
    return Replica(name, proc, log_path)


def wait_for(what: str, probe: Any, timeout_s: float, replica: Replica | None = None) -> None:
    """Poll `probe()` until it returns True; raise TimeoutError (with the replica's log) otherwise, or
    RuntimeError as soon as the replica exits."""
    deadline = time.monotonic() + timeout_s
    while not probe():
        if replica is not None and replica.proc.poll() is not None:
            raise RuntimeError(f"{replica.name} exited ({replica.proc.returncode}):\n{replica.log()[-4000:]}")
        if time.monotonic() > deadline:
            tail = replica.log()[-4000:] if replica is not None else ""
            raise TimeoutError(f"{what}: not within {timeout_s}s\n{tail}")
        time.sleep(0.1)


def http_json(url: str, body: Mapping[str, Any] | None = None, timeout_s: float = 60.0) -> tuple[int, Any]:
    """GET (body None) or POST JSON; returns (status, parsed body). Error statuses are returned, not
    raised; connection errors raise OSError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def healthcheck(script: Path, role: str, env: Mapping[str, str]) -> bool:
    """Run the image's healthcheck script as Docker would (exit 0 = healthy)."""
    done = subprocess.run(
        [sys.executable, str(script), role], env=dict(env), capture_output=True, timeout=30, check=False
    )
    return done.returncode == 0


def mapped_files(pid: int, prefix: str) -> set[str]:
    """Paths starting with `prefix` that process `pid` has mapped into memory (from /proc/pid/maps)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    paths = {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}
    return {p for p in paths if p.startswith(prefix)}


def close_all(replicas: list[Replica], grace_s: float = 5.0) -> None:
    """Kill whatever is still running (test failure path); never raises."""
    for replica in replicas:
        if replica.proc.poll() is None:
            replica.stop(grace_s)
