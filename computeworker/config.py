"""Worker configuration: one frozen record built from flags and RADIXKV_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_run_dir() -> Path:
    """$RADIXKV_RUN_DIR, else /tmp/radixkv-<uid> (the daemon uses the same rule)."""
    env = os.environ.get("RADIXKV_RUN_DIR")
    return Path(env) if env else Path(f"/tmp/radixkv-{os.getuid()}")


def default_daemon_endpoint() -> str:
    return f"ipc://{default_run_dir() / 'workers.sock'}"


# The extend graphs' attention backends (computeworker.model.extend_graphs.BACKENDS).
EXTEND_ATTENTION_CHOICES = ("auto", "fa2", "fa3", "fa3-split")

# Batch limits when left at 0 ("by device"): (max_running, prefill_chunk). A CPU worker computes one
# request's chunk at a time at a few hundred tokens/s; a GPU step is weight-read bound below ~100 rows,
# so batches and chunks are large (SGLang's chunked-prefill default on 80 GB cards is 8192 as well).
# Measured on the multi-turn bench (H200, bench/results/gpu_notes.md runs 28 and 30): chunks of 4k-16k
# tokens served equally, 2k cost ~5% (the smaller chunk bounds activation memory and the time decodes
# wait behind a prefill); 256 running instead of 128 kept throughput and cut TTFT p50 from 2.9 s to
# 0.2 s with 256 clients. The pool, not this limit, bounds the KV: requests past it wait for pages.
DEVICE_DEFAULTS = {"cpu": (16, 512), "cuda": (256, 8192)}


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    daemon_endpoint: str
    model_path: Path | None = None  # None: the embedded default model
    device: str = "cpu"  # "cpu" or "cuda:N"
    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16 on CUDA), "float32", "float16", "bfloat16"
    max_running: int = 0  # requests batched at once; 0 = by device (DEVICE_DEFAULTS)
    prefill_chunk: int = 0  # prompt tokens per step; 0 = by device (DEVICE_DEFAULTS)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    name: str = ""
    welcome_timeout_s: float = 2.0  # no Welcome within this: reconnect
    reconnect_min_s: float = 0.1  # backoff between registration attempts, doubling up to the max
    reconnect_max_s: float = 2.0
    stream_max_tokens: int = 4
    stream_interval_s: float = 0.02
    random_weights: bool = False  # seeded random weights of the model dir's shape (benchmarks, tests)
    seed: int = 0  # random-weights seed: workers with the same seed hold identical weights
    cuda_graphs: bool = True  # decode through CUDA graphs (CUDA only)
    max_graph_batch: int = 0  # largest captured decode batch; 0 = max_running
    log_steps: bool = False  # log every forward step's size and time (INFO)
    mixed_steps: bool | None = None  # decodes inside prefill steps; None: on for CPU, off for CUDA
    extend_attention: str = "auto"  # attention of the extend graphs: auto, fa2, fa3 or fa3-split (CUDA)

    def __post_init__(self) -> None:
        if not self.daemon_endpoint.startswith(("ipc://", "tcp://", "inproc://")):
            raise ValueError(
                f"daemon endpoint must be ipc://, tcp:// or inproc://, got {self.daemon_endpoint!r}"
            )
        if self.device != "cpu" and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ValueError(f"device must be 'cpu' or 'cuda:N', got {self.device!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        for name in ("max_running", "prefill_chunk"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 1 (or 0: by device), got {getattr(self, name)}")
        running, chunk = DEVICE_DEFAULTS[self.device.split(":")[0]]
        # Frozen: resolve the "by device" zeros once, so every reader sees the numbers in use.
        object.__setattr__(self, "max_running", self.max_running or running)
        object.__setattr__(self, "prefill_chunk", self.prefill_chunk or chunk)
        if self.stream_max_tokens < 1:
            raise ValueError(f"stream_max_tokens must be at least 1, got {self.stream_max_tokens}")
        if self.random_weights and self.model_path is None:
            raise ValueError("--random-weights needs --model: a directory with the config.json to follow")
        if self.extend_attention not in EXTEND_ATTENTION_CHOICES:
            raise ValueError(
                f"extend_attention must be one of {EXTEND_ATTENTION_CHOICES}, got {self.extend_attention!r}"
            )
        if self.max_graph_batch < 0:
            raise ValueError("max_graph_batch must be >= 0")
        if self.threads < 0:
            raise ValueError("threads must be >= 0")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s or self.welcome_timeout_s <= 0:
            raise ValueError("reconnect/welcome timings must be positive with min <= max")

    @property
    def resolved_mixed_steps(self) -> bool:
        """CPU attention loops over sequences, so mixing costs nothing there; on a GPU a decode row in a
        prefill step wastes an attention tile and misses the decode graph (computeworker.engine.scheduler)."""
        return self.device == "cpu" if self.mixed_steps is None else self.mixed_steps

    @property
    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.device == "cpu" else "bfloat16"
