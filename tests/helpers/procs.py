"""Start the daemon and scripted workers as real processes on temporary paths, and clean them up.

Use ``ProcessGroup`` as a context manager: everything it started is killed (SIGKILL after a grace
period) when the block exits, even when the test failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_tiny_model(directory: Path, *, vocab_size: int = 1024, max_position_embeddings: int = 4096) -> Path:
    """A model directory holding only a Llama config.json: enough for the daemon (it loads no weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "_name_or_path": "tiny-llama",
        "vocab_size": vocab_size,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "eos_token_id": 2,
        "bos_token_id": 1,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ProcessGroup:
    """Processes started for one test; ``close()`` (or leaving the ``with`` block) ends them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / log_name, "wb")  # noqa: SIM115 - the child owns it until it exits
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.procs.append(proc)
        return proc

    def start_daemon(
        self, model_dir: Path, *extra: str, timeout_s: float = 30.0
    ) -> tuple[subprocess.Popen[bytes], dict]:
        """``python -m cachemgr serve`` on temp paths; returns (process, ready-file info)."""
        run_dir = self.tmp / "run"
        ready = self.tmp / "ready.json"
        args = [
            "-m", "cachemgr", "serve", "--model", str(model_dir), "--run-dir", str(run_dir),
            "--http-port", "0", "--ready-file", str(ready), *extra,
        ]  # fmt: skip
        proc = self.spawn(args, "daemon.log")
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}:\n{self.read_log('daemon.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon not ready in {timeout_s}s:\n{self.read_log('daemon.log')}")
            time.sleep(0.05)
        return proc, json.loads(ready.read_text())

    def start_worker(self, endpoint: str, name: str, *extra: str) -> subprocess.Popen[bytes]:
        log = self.tmp / "events.jsonl"
        args = [
            "-m",
            "tests.helpers.scripted_worker",
            "--daemon",
            endpoint,
            "--name",
            name,
            "--log",
            str(log),
            *extra,
        ]
        return self.spawn(args, f"worker-{name}.log")

    def read_log(self, name: str) -> str:
        path = self.tmp / name
        return path.read_text(errors="replace") if path.exists() else ""

    def events(self) -> list[dict]:
        """The scripted workers' JSON-lines event log, in order."""
        text = self.read_log("events.jsonl")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def close(self, grace_s: float = 3.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def wait_for(predicate: object, timeout_s: float = 10.0, interval_s: float = 0.02) -> None:
    """Poll ``predicate()`` until true; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)
