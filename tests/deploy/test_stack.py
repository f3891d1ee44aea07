"""`docker compose --profile cpu up --scale worker-cpu=3`, then scale to 1 and back to 3 while requests
flow, with no Docker: each service's command runs as a local process with that service's environment
from compose.yaml over its image's ENV (container paths mapped into a temp dir). The image healthchecks
(extracted from the Dockerfile) gate start-up exactly as `depends_on: service_healthy` would."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import compose_file, dockerfile
from tests.deploy.local_stack import (
    Replica,
    close_all,
    healthcheck,
    host_env,
    http_json,
    image_env,
    map_paths,
    mapped_files,
    spawn,
    stop_together,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DAEMON, WORKER = "cachemgr-cpu", "worker-cpu"
SYSTEM = "You are a terse assistant. Answer in one word."
QUESTIONS = ("Name a color.", "Name a fruit.", "Name a planet.", "Name a tree.", "Name a river.")
MAX_TOKENS = 2


@dataclass
class Result:
    phase: str
    status: int
    body: Any


class Traffic:
    """Client threads sending chat completions back to back until stopped; every outcome is kept."""

    def __init__(self, url: str, model: str, num_clients: int) -> None:
        self.url, self.model = url, model
        self.phase = "3 workers"
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(num_clients)
        ]

    def _client(self, index: int) -> None:
        turn = index
        while not self._stop.is_set():
            question = QUESTIONS[turn % len(QUESTIONS)]
            turn += 1
            body = {
                "model": self.model,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            }
            phase = self.phase
            try:
                status, reply = http_json(f"{self.url}/v1/chat/completions", body)
            except OSError as exc:  # a refused or dropped connection is a failed request too
                status, reply = -1, repr(exc)
            with self._lock:
                self.results.append(Result(phase, status, reply))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def reached(self, phase: str, num_ok: int) -> bool:
        """Whether `num_ok` requests of `phase` succeeded; raises at the first failed request (any
        phase), so a broken stack fails the test at once instead of at a timeout."""
        with self._lock:
            failed = [r for r in self.results if r.status != 200]
            if failed:
                raise AssertionError(
                    f"request failed during {failed[0].phase!r}: {failed[0].status} {failed[0].body}"
                )
            return sum(r.phase == phase for r in self.results) >= num_ok

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)


@pytest.fixture(scope="module")
def model_cache_dir(smollm2_gguf: Path) -> Path:
    """The directory the CPU image bakes the embedded model into ($RADIXKV_CACHE_DIR): the one holding
    models/<gguf>, where shared.default_model looks."""
    return smollm2_gguf.parent.parent


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    close_all(started)


def test_cpu_profile_scales_workers_while_serving(
    tmp_path: Path, model_cache_dir: Path, replicas: list[Replica]
) -> None:
    compose = compose_file.load({"RADIXKV_THREADS": "1"})  # 2 shared cores: keep workers from fighting
    services = compose_file.active_services(compose, {"cpu"})
    assert sorted(services) == [DAEMON, WORKER]
    stages = dockerfile.load()[1]
    (heredoc,) = [i.heredoc for i in stages["common"].all("COPY") if "radixkv-healthcheck" in i.args]
    probe = tmp_path / "radixkv-healthcheck"
    probe.write_text(heredoc)

    # The published port "ADDR:HOST_PORT:CONTAINER_PORT": locally the daemon binds ADDR on a free port.
    (published,) = services[DAEMON]["ports"]
    address, _, container_port = published.split(":")
    port = _free_port(address)
    run_dir = tmp_path / "run"  # the bind-mounted run directory; exists before `up`, like ./run
    run_dir.mkdir(mode=0o700)
    paths = {"/run/radixkv": run_dir, "/opt/radixkv": model_cache_dir}

    def env_of(name: str, **extra: str) -> dict[str, str]:
        svc = services[name]
        env = image_env(stages, svc["build"]["target"], svc["build"]["args"]["VARIANT"])
        env.update(compose_file.environment(svc))
        return host_env(map_paths(env, paths) | extra)

    daemon_env = env_of(DAEMON)
    assert (daemon_env["RADIXKV_HTTP_HOST"], daemon_env["RADIXKV_HTTP_PORT"]) == ("0.0.0.0", container_port)
    daemon_env |= {"RADIXKV_HTTP_HOST": address, "RADIXKV_HTTP_PORT": str(port)}
    url = f"http://{address}:{port}"

    def start_worker(index: int) -> Replica:
        # The worker image's entrypoint names each worker after its container's hostname.
        name = f"radixkv-{WORKER}-{index}"
        replica = spawn(name, services[WORKER]["command"], env_of(WORKER, RADIXKV_WORKER_NAME=name), tmp_path)
        replicas.append(replica)
        return replica

    def healthy_worker(replica: Replica) -> None:
        worker_env = env_of(WORKER, RADIXKV_WORKER_NAME=replica.name)
        wait_for(f"{replica.name} healthy", lambda: healthcheck(probe, "worker", worker_env), 120, replica)

    def registered() -> int:
        return http_json(f"{url}/health")[1]["workers"]

    # up: the daemon first, workers once its healthcheck passes (depends_on: service_healthy).
    daemon = spawn(DAEMON, services[DAEMON]["command"], daemon_env, tmp_path)
    replicas.append(daemon)
    wait_for("daemon healthy", lambda: healthcheck(probe, "cachemgr", daemon_env), 60, daemon)
    assert http_json(f"{url}/health")[0] == 503  # healthy for Docker, not yet for a load balancer
    workers = [start_worker(i) for i in (1, 2, 3)]
    for worker in workers:
        healthy_worker(worker)
    assert registered() == 3
    (pool_path,) = mapped_files(workers[0].proc.pid, "/dev/shm/radixkv-")
    assert {frozenset(mapped_files(w.proc.pid, "/dev/shm/radixkv-")) for w in workers} == {
        frozenset([pool_path])
    }

    model = http_json(f"{url}/v1/models")[1]["data"][0]["id"]
    traffic = Traffic(url, model, num_clients=3)
    traffic.start()
    try:
        wait_for("requests on 3 workers", lambda: traffic.reached("3 workers", 6), 60)

        # --scale worker-cpu=1: compose stops the highest-numbered replicas (SIGTERM, grace period).
        traffic.phase = "scaling down"
        grace = float(services[WORKER]["stop_grace_period"].rstrip("s"))
        assert stop_together(workers[1:], grace) == [0, 0]
        wait_for("daemon sees 1 worker", lambda: registered() == 1, 30)
        traffic.phase = "1 worker"
        wait_for("requests on 1 worker", lambda: traffic.reached("1 worker", 4), 60)

        # --scale worker-cpu=3 again.
        traffic.phase = "scaling up"
        workers[1:] = [start_worker(2), start_worker(3)]
        for worker in workers[1:]:
            healthy_worker(worker)
        wait_for("daemon sees 3 workers", lambda: registered() == 3, 30)
        traffic.phase = "3 workers again"
        wait_for("requests on 3 workers again", lambda: traffic.reached("3 workers again", 6), 60)
    finally:
        traffic.stop()

    failed = [r for r in traffic.results if r.status != 200]
    assert failed == []
    for result in traffic.results:
        choice = result.body["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        assert 1 <= result.body["usage"]["completion_tokens"] <= MAX_TOKENS
    phases = {r.phase for r in traffic.results}
    assert {"3 workers", "scaling down", "1 worker", "scaling up", "3 workers again"} <= phases

    # The admin CLI from the "host", through the socket in the mounted run directory.
    admin_env = host_env({"RADIXKV_RUN_DIR": str(run_dir)})
    stats = _admin(["stats", "--json"], admin_env)
    assert stats["cache"]["tokens_hit"] > 0  # the shared system prompt was served from the cache
    assert _admin(["check", "--json"], admin_env)["healthy"] is True

    # down: workers first, then the daemon; everything it owned is gone.
    assert stop_together(workers, grace) == [0, 0, 0]
    assert daemon.stop(30) == 0
    assert not Path(pool_path).exists()
    assert not (run_dir / "admin.sock").exists()


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _admin(args: list[str], env: dict[str, str]) -> Any:
    done = subprocess.run(
        ["cachemgr", "admin", *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_path_mapping_and_image_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stages = dockerfile.load()[1]
    assert image_env(stages, "cachemgr", "cpu") == {
        "RADIXKV_CACHE_DIR": "/opt/radixkv",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "RADIXKV_RUN_DIR": "/run/radixkv",
        "RADIXKV_HTTP_HOST": "0.0.0.0",
        "RADIXKV_HTTP_PORT": "8000",
    }
    assert image_env(stages, "worker", "gpu")["FLASHINFER_WORKSPACE_BASE"] == "/var/cache/flashinfer"
    mapped = map_paths(
        {"A": "/run/radixkv", "B": "/run/radixkv/x.sock", "C": "/run/radixkvz", "D": "ipc:///run/radixkv"},
        {"/run/radixkv": tmp_path},
    )
    assert mapped == {
        "A": str(tmp_path),
        "B": f"{tmp_path}/x.sock",
        "C": "/run/radixkvz",
        "D": "ipc:///run/radixkv",
    }
    monkeypatch.setenv("RADIXKV_KV_BUDGET", "1GiB")  # a developer's shell must not leak into services
    env = host_env({"RADIXKV_DEVICE": "cpu"})
    assert {k: v for k, v in env.items() if k.startswith("RADIXKV_")} == {"RADIXKV_DEVICE": "cpu"}
