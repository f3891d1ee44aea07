"""`cachemgr serve` configuration: command-line flags, each with a RADIXKV_* environment variable.

Precedence: a flag given on the command line wins over its environment variable, which wins over the
default. The environment variable of ``--http-port`` is ``RADIXKV_HTTP_PORT`` (and so on), so compose
files can configure everything without a command line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cachemgr.admin.server import MIN_TOKEN_LEN
from cachemgr.cache import DEFAULT_POLICY, POLICIES
from cachemgr.daemon.settings import DISPATCH_MODES, DaemonSettings
from shared.pool import parse_size

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
KV_DTYPES = ("auto", "float32", "float16", "bfloat16")


def default_run_dir(env: Mapping[str, str]) -> str:
    return env.get("RADIXKV_RUN_DIR") or f"/tmp/radixkv-{os.getuid()}"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _keys(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _optional_int(text: str) -> int | None:
    return None if text.strip() in ("", "none") else int(text)


def _size_or_off(text: str) -> int:
    """A byte size, or 0 for "0" / "off" (a feature turned off)."""
    return 0 if text.strip().lower() in ("0", "off") else parse_size(text)


# (field, type, default, help). None defaults that depend on other options are resolved in build_config.
_OPTIONS: tuple[tuple[str, Callable[[str], Any], Any, str], ...] = (
    (
        "model",
        str,
        "",
        "Model: a Hugging Face directory (config.json) or a GGUF file. Default: the embedded SmolLM2-135M-Instruct (fetched once). Only the config and tokenizer are read: the daemon loads no weights.",
    ),
    (
        "model_name",
        str,
        "",
        "Name served in /v1/models and used as the cache namespace. Default: the model's own name.",
    ),
    (
        "run_dir",
        str,
        "",
        "Directory for sockets and the ready file. Default: $RADIXKV_RUN_DIR or /tmp/radixkv-$UID.",
    ),
    (
        "worker_endpoint",
        str,
        "",
        "ZeroMQ endpoint workers connect to (ipc://PATH or tcp://HOST:PORT). Default: ipc://<run dir>/workers.sock.",
    ),
    ("admin_socket", str, "", "Admin Unix socket path (mode 0600). Default: <run dir>/admin.sock."),
    (
        "admin_tcp_port",
        _optional_int,
        None,
        "Also serve admin commands on this TCP port (needs --admin-token).",
    ),
    ("admin_token", str, "", "Token TCP admin clients must present."),
    ("http_host", str, "127.0.0.1", "HTTP (OpenAI API) listen address."),
    ("http_port", int, 8000, "HTTP listen port; 0 picks a free one (see the ready file)."),
    ("disable_http", _bool, False, "Serve no HTTP API (workers and admin only)."),
    (
        "api_keys",
        _keys,
        (),
        "Comma-separated API keys required as 'Authorization: Bearer KEY' (default: none, open).",
    ),
    (
        "salt_from_api_key",
        _bool,
        False,
        "Give each API key its own cache namespace (prefixes never shared across keys).",
    ),
    (
        "tokenize_cache_size",
        _size_or_off,
        "64MiB",
        "Memory bound of the HTTP API's cache of tokenized text between special tokens (a repeated system prompt is tokenized once; the ids stay exact). 0 turns it off.",
    ),
    (
        "kv_budget",
        parse_size,
        "512MiB",
        "KV pool memory budget, e.g. 512MiB or 8GiB; the pool holds as many pages as fit.",
    ),
    ("num_pages", _optional_int, None, "Exact number of KV pages (overrides --kv-budget)."),
    ("page_size", int, 16, "Tokens per KV page (the unit of sharing)."),
    (
        "kv_dtype",
        str,
        "auto",
        "KV dtype: float32, float16, bfloat16, or auto (float32 on CPU, bfloat16 on GPU).",
    ),
    (
        "device",
        str,
        "cpu",
        "Where the pool lives: cpu (a /dev/shm file) or a GPU as cuda:N, N or GPU-<uuid> (CUDA IPC).",
    ),
    ("heartbeat_interval", float, 1.0, "Seconds between worker heartbeats (told to workers)."),
    (
        "heartbeat_timeout",
        float,
        5.0,
        "A worker silent this many seconds is dead: its leases are released and its requests re-dispatched.",
    ),
    (
        "worker_stall_timeout",
        float,
        120.0,
        "A worker holding requests that completes no engine step (per its heartbeats) and sends nothing else "
        "for this many seconds is told to shut down and its requests re-dispatched; 0 = off. Keep it above "
        "the longest prefill chunk.",
    ),
    ("max_queue", int, 256, "Requests waiting for a worker or pages before new ones get 'overloaded'."),
    (
        "page_wait_timeout",
        float,
        30.0,
        "Seconds a request waits for KV pages while the pool is full before it fails.",
    ),
    (
        "worker_wait_timeout",
        float,
        30.0,
        "Seconds an accepted request waits for a worker with a free slot before it fails.",
    ),
    (
        "decode_page_chunk",
        int,
        4,
        "Pages handed out per decode chunk (fewer round trips vs. less reserved memory).",
    ),
    ("max_attempts", int, 3, "Dispatches per request before a request whose workers keep dying fails."),
    (
        "shutdown_grace",
        float,
        25.0,
        "On SIGTERM / SIGINT: seconds the accepted requests get to finish while new ones are refused (503 "
        "'shutting_down', /health 503 'draining'); 0 = stop at once. A second signal stops at once. Keep it "
        "below the orchestrator's kill timeout (compose: stop_grace_period 30s).",
    ),
    (
        "dispatch",
        str,
        "auto",
        "How requests are spread over workers: spread (the least-loaded worker), pack (the busiest worker with a "
        "free slot: workers sharing one GPU each read all the weights per step, so splitting a batch between "
        "them costs throughput), or auto (pack when the pool is on a GPU, spread on CPU).",
    ),
    ("eviction_policy", str, DEFAULT_POLICY, f"Cache eviction policy: {', '.join(sorted(POLICIES))}."),
    (
        "kv_events_endpoint",
        str,
        "",
        "Publish KV events (vLLM msgpack schema) on this ZeroMQ PUB endpoint, e.g. tcp://*:5557. Off by default.",
    ),
    (
        "ready_file",
        str,
        "",
        "Write a JSON file with the bound endpoints once serving (for scripts and tests).",
    ),
    ("log_level", str.upper, "INFO", f"Log level: {', '.join(LOG_LEVELS)}."),
)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything `cachemgr serve` needs, validated. Paths are resolved (no empty defaults remain)."""

    model: str
    model_name: str
    run_dir: str
    worker_endpoint: str
    admin_socket: str
    admin_tcp_port: int | None
    admin_token: str
    http_host: str
    http_port: int
    disable_http: bool
    api_keys: tuple[str, ...]
    salt_from_api_key: bool
    tokenize_cache_size: int
    kv_budget: int
    num_pages: int | None
    page_size: int
    kv_dtype: str
    device: str
    heartbeat_interval: float
    heartbeat_timeout: float
    worker_stall_timeout: float
    max_queue: int
    page_wait_timeout: float
    worker_wait_timeout: float
    decode_page_chunk: int
    max_attempts: int
    shutdown_grace: float
    dispatch: str
    eviction_policy: str
    kv_events_endpoint: str
    ready_file: str
    log_level: str

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"http port out of range: {self.http_port}")
        if not 0 <= self.shutdown_grace <= 3600:
            raise ValueError(f"shutdown grace must be in [0, 3600] seconds, got {self.shutdown_grace}")
        if self.page_size < 1 or self.page_size > 1024:
            raise ValueError(f"page size must be in [1, 1024], got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num pages must be at least 2, got {self.num_pages}")
        if self.eviction_policy not in POLICIES:
            raise ValueError(
                f"eviction policy must be one of {sorted(POLICIES)}, got {self.eviction_policy!r}"
            )
        if self.dispatch not in ("auto", *DISPATCH_MODES):
            raise ValueError(f"dispatch must be auto, spread or pack, got {self.dispatch!r}")
        if self.admin_tcp_port is not None and len(self.admin_token) < MIN_TOKEN_LEN:
            raise ValueError(f"--admin-tcp-port needs --admin-token (at least {MIN_TOKEN_LEN} characters)")
        self.daemon_settings()  # validates the worker-channel options

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def pool_kind(self) -> str:
        return "cuda_ipc" if self.on_gpu else "shm"

    @property
    def resolved_kv_dtype(self) -> str:
        if self.kv_dtype != "auto":
            return self.kv_dtype
        return "bfloat16" if self.on_gpu else "float32"

    def daemon_settings(self) -> DaemonSettings:
        return DaemonSettings(
            endpoint=self.worker_endpoint,
            heartbeat_interval_s=self.heartbeat_interval,
            heartbeat_timeout_s=self.heartbeat_timeout,
            worker_stall_timeout_s=self.worker_stall_timeout,
            max_queue=self.max_queue,
            page_wait_timeout_s=self.page_wait_timeout,
            worker_wait_timeout_s=self.worker_wait_timeout,
            decode_page_chunk=self.decode_page_chunk,
            max_attempts=self.max_attempts,
            dispatch=self.resolved_dispatch,
        )

    @property
    def resolved_dispatch(self) -> str:
        if self.dispatch != "auto":
            return self.dispatch
        return "pack" if self.on_gpu else "spread"


def env_name(field: str) -> str:
    return "RADIXKV_" + field.upper()


def build_parser(prog: str = "cachemgr serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the radixkv cache-manager daemon: KV pool, prefix cache, worker dispatch, admin and HTTP.",
        epilog="Every flag has an environment variable: --http-port is RADIXKV_HTTP_PORT, and so on. "
        "A flag wins over its variable, which wins over the default.",
    )
    for field, convert, default, help_text in _OPTIONS:
        flag = "--" + field.replace("_", "-")
        shown = "" if default in ("", None, ()) else f" (default: {default})"
        extra: dict[str, Any] = {"nargs": "?", "const": True, "metavar": "BOOL"} if convert is _bool else {}
        parser.add_argument(
            flag,
            dest=field,
            type=convert,
            default=None,
            help=f"{help_text}{shown} [{env_name(field)}]",
            **extra,
        )
    return parser


def build_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> DaemonConfig:
    """Parse flags, fill from the environment, then defaults. Raises ValueError (with the option's name)
    for a bad value; argparse exits on unknown flags and on --help."""
    env = os.environ if env is None else env
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    for field, convert, default, _ in _OPTIONS:
        value = args[field]
        if value is None and env_name(field) in env:
            try:
                value = convert(env[env_name(field)])
            except ValueError as exc:
                raise ValueError(f"{env_name(field)}: {exc}") from None
        if value is None:
            value = (
                convert(default) if isinstance(default, str) and convert not in (str, str.upper) else default
            )
        values[field] = value
    run_dir = values["run_dir"] or default_run_dir(env)
    values["run_dir"] = run_dir
    values["worker_endpoint"] = values["worker_endpoint"] or f"ipc://{Path(run_dir) / 'workers.sock'}"
    values["admin_socket"] = values["admin_socket"] or str(Path(run_dir) / "admin.sock")
    assert {f.name for f in fields(DaemonConfig)} == set(values)
    return DaemonConfig(**values)
