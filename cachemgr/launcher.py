"""`cachemgr up`: the whole local stack in one command, supervised.

    cachemgr up ──starts──► python -m cachemgr serve        (daemon: cache, pool, HTTP on --http-port)
                 └─starts─► python -m computeworker  (N of them)     (connect to ipc://<run dir>/workers.sock)

Waits until /health answers 200, prints the URL and a curl example, restarts any child that dies (with
exponential backoff), and on Ctrl-C / SIGTERM stops the workers first, then the daemon (which unlinks
its shared memory and sockets), escalating to SIGKILL after a timeout. Children run in their own
session (a terminal's Ctrl-C reaches only the supervisor, which then stops them in order) and get
SIGTERM if the supervisor itself dies (Linux parent-death signal), so nothing is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
HEALTHY_RUN_S = 30.0
SHM_DIR = Path("/dev/shm")  # a child that ran this long before dying starts again without backoff


def default_run_dir() -> Path:
    env = os.environ.get("RADIXKV_RUN_DIR")
    return Path(env) if env else Path(f"/tmp/radixkv-{os.getuid()}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (for --http-port 0: the supervisor must know the port to probe)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class StackConfig:
    """What `cachemgr up` starts. model None = the embedded default (each process resolves it)."""

    num_workers: int = 2
    model: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    run_dir: Path = field(default_factory=default_run_dir)
    device: str = "cpu"
    worker_threads: int = 0  # 0: the machine's cores split evenly between the workers
    log_dir: Path | None = None  # None: children write to this process's stdout/stderr
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 10.0
    daemon_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if not 0 < self.http_port < 65536:
            raise ValueError(f"http_port must be in 1..65535, got {self.http_port}")
        if self.worker_threads < 0 or self.ready_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("worker_threads must be >= 0 and timeouts positive")

    @property
    def url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    @property
    def worker_endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'workers.sock'}"

    def daemon_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "cachemgr", "serve", "--http-host", self.http_host]
        argv += ["--http-port", str(self.http_port), *self._model_flag(), *self.daemon_args]
        return argv

    def worker_argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "computeworker",
            "--daemon",
            self.worker_endpoint,
            "--device",
            self.device,
        ]
        argv += ["--threads", str(self.threads_per_worker()), *self._model_flag(), *self.worker_args]
        return argv

    def _model_flag(self) -> list[str]:
        return ["--model", self.model] if self.model else []

    def threads_per_worker(self) -> int:
        if self.worker_threads:
            return self.worker_threads
        return max(1, (os.cpu_count() or 1) // max(1, self.num_workers))


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask Linux for SIGTERM when the supervisor dies."""
    # Not Linux: no parent-death signal, but the supervisor's own shutdown path still stops children.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One supervised process. Not thread-safe: driven by the supervisor's loop only."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path | None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.num_restarts = 0
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.backoff_s = BACKOFF_MIN_S

    def start(self) -> None:
        log: IO[bytes] | None = None
        if self.log_dir is not None:
            log = open(self.log_dir / f"{self.name}.log", "ab")  # noqa: SIM115 - closed below; Popen dups the fd
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            if log is not None:
                log.close()
        self.started_at = time.monotonic()
        self.restart_at = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, deadline: float) -> bool:
        """Wait until the process exits or the monotonic deadline passes; True if it exited."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True


class Supervisor:
    """Starts, watches and stops the stack. Use start(), then wait_ready(), then poll() periodically
    until stop(). stop() is idempotent and leaves no child running."""

    def __init__(self, config: StackConfig, out: IO[str] = sys.stderr) -> None:
        self.config = config
        self.out = out
        env = dict(os.environ, RADIXKV_RUN_DIR=str(config.run_dir), PYTHONUNBUFFERED="1")
        self.daemon = Child("daemon", config.daemon_argv(), env, config.log_dir)
        self.workers = [
            Child(f"worker-{i}", config.worker_argv(), env, config.log_dir) for i in range(config.num_workers)
        ]
        self._stopped = False

    @property
    def children(self) -> list[Child]:
        return [*self.workers, self.daemon]

    def start(self) -> None:
        self.config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.config.log_dir is not None:
            self.config.log_dir.mkdir(parents=True, exist_ok=True)
        self.daemon.start()
        for worker in self.workers:
            worker.start()

    def wait_ready(self, min_workers: int = 1, cancel: threading.Event | None = None) -> bool:
        """Block until /health reports at least min_workers ready workers (True), or `cancel` is set
        (False). Raises RuntimeError if the daemon exits first or the ready timeout passes."""
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            if not self.daemon.running:
                code = self.daemon.proc.returncode if self.daemon.proc else None
                raise RuntimeError(f"the daemon exited during startup (exit code {code})")
            num_workers = self.health_workers()
            if num_workers is not None and num_workers >= min_workers:
                return True
            self.poll()
            if cancel is not None and cancel.wait(0.2):
                return False
            if cancel is None:
                time.sleep(0.2)
        raise RuntimeError(f"the stack was not ready within {self.config.ready_timeout_s:.0f} s")

    def health_workers(self) -> int | None:
        """Workers ready according to /health (registered and warmed up); None while the daemon does not
        answer."""
        try:
            with urllib.request.urlopen(self.config.url + "/health", timeout=2) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:  # 503: up, but no worker yet
            body = exc.read()
        except OSError:
            return None
        try:
            return int(json.loads(body)["ready_workers"])
        except (ValueError, KeyError, TypeError):
            return None

    def poll(self) -> None:
        """Restart children that died, each after its backoff (doubling while it keeps dying young)."""
        if self._stopped:
            return
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.running:
                continue
            if child.restart_at is None:
                lived = now - child.started_at
                child.backoff_s = (
                    BACKOFF_MIN_S if lived > HEALTHY_RUN_S else min(child.backoff_s * 2, BACKOFF_MAX_S)
                )
                child.restart_at = now + child.backoff_s
                self._say(
                    f"{child.name} exited with code {child.proc.returncode}; restarting in {child.backoff_s:.1f} s"
                )
                self._remove_daemon_leftovers(child)
            elif now >= child.restart_at:
                child.num_restarts += 1
                child.start()

    def stop(self) -> None:
        """Workers first (their in-flight work is abandoned cleanly), then the daemon, which removes the
        pool and its sockets. SIGKILL after stop_timeout_s for anything still alive."""
        if self._stopped:
            return
        self._stopped = True
        for group in (self.workers, [self.daemon]):
            for child in group:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + self.config.stop_timeout_s
            for child in group:
                if not child.wait(deadline):
                    self._say(f"{child.name} did not stop in {self.config.stop_timeout_s:.0f} s: killing it")
                    child.signal(signal.SIGKILL)
                    child.wait(time.monotonic() + 5.0)
        self._remove_daemon_leftovers(self.daemon)
        self._remove_stale_sockets()

    def _remove_stale_sockets(self) -> None:
        # The daemon unlinks these on a clean exit; after a SIGKILL they would block the next start.
        for name in ("workers.sock", "admin.sock"):
            (self.config.run_dir / name).unlink(missing_ok=True)

    def _remove_daemon_leftovers(self, child: Child) -> None:
        """After the daemon died without cleaning up (SIGKILL, crash), remove what only it would have:
        its shared-memory pool (named after its uid and pid by cachemgr.main) and its sockets."""
        if child is not self.daemon or child.proc is None or child.proc.returncode in (0, None):
            return
        SHM_DIR.joinpath(f"radixkv-{os.getuid()}-{child.proc.pid}.kv").unlink(missing_ok=True)
        self._remove_stale_sockets()

    def _say(self, message: str) -> None:
        print(f"[cachemgr up] {message}", file=self.out, flush=True)

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_args(argv: Sequence[str]) -> StackConfig:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="cachemgr up", description="Start the daemon and N workers on one machine, supervised."
    )
    p.add_argument("--workers", type=int, default=int(env("RADIXKV_WORKERS", "2")), help="worker processes")
    p.add_argument("--model", default=env("RADIXKV_MODEL"), help="HF dir or GGUF (default: embedded SmolLM2)")
    p.add_argument("--http-host", default=env("RADIXKV_HTTP_HOST", "127.0.0.1"))
    p.add_argument("--http-port", type=int, default=int(env("RADIXKV_HTTP_PORT", "8000")), help="0 = any")
    p.add_argument("--run-dir", type=Path, default=default_run_dir(), help="sockets live here")
    p.add_argument("--device", default=env("RADIXKV_DEVICE", "cpu"), help="cpu or cuda:N for the workers")
    p.add_argument("--worker-threads", type=int, default=int(env("RADIXKV_WORKER_THREADS", "0")))
    p.add_argument("--log-dir", type=Path, default=env("RADIXKV_LOG_DIR"), help="one log file per process")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--daemon-arg", action="append", default=[], help="extra flag for `cachemgr serve`")
    p.add_argument("--worker-arg", action="append", default=[], help="extra flag for each worker")
    a = p.parse_args(list(argv))
    try:
        return StackConfig(
            num_workers=a.workers,
            model=a.model,
            http_host=a.http_host,
            http_port=a.http_port or free_port(a.http_host),
            run_dir=a.run_dir,
            device=a.device,
            worker_threads=a.worker_threads,
            log_dir=Path(a.log_dir) if a.log_dir else None,
            ready_timeout_s=a.ready_timeout,
            daemon_args=tuple(a.daemon_arg),
            worker_args=tuple(a.worker_arg),
        )
    except ValueError as exc:
        p.error(str(exc))
        raise  # unreachable: p.error exits


def main(argv: Sequence[str] | None = None) -> int:
    """`cachemgr up`: returns 0 after a clean Ctrl-C / SIGTERM, 1 if the stack failed to start."""
    config = parse_args(sys.argv[1:] if argv is None else argv)
    stop_requested = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.set())
    supervisor = Supervisor(config)
    try:
        supervisor.start()
        if not supervisor.wait_ready(min_workers=min(1, config.num_workers), cancel=stop_requested):
            return 0
        print(f"radixkv is serving at {config.url}  (Ctrl-C stops it)", flush=True)
        print(
            f"  curl {config.url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            """    -d '{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'""",
            flush=True,
        )
        while not stop_requested.wait(0.2):
            supervisor.poll()
        return 0
    except RuntimeError as exc:
        print(f"[cachemgr up] {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        supervisor.stop()


if __name__ == "__main__":
    sys.exit(main())
