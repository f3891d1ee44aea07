"""`computeworker`: load the model, connect to the daemon, serve until told to stop.

Every flag has an environment variable (RADIXKV_<FLAG>), so compose files need no command lines.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from computeworker.config import EXTEND_ATTENTION_CHOICES, WorkerConfig, default_daemon_endpoint

if TYPE_CHECKING:
    from computeworker.runtime import WorkerRuntime

log = logging.getLogger("computeworker")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"RADIXKV_{name}", default)


def _flag(name: str, default: bool = False) -> bool:
    value = _env(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="computeworker", description="radixkv compute worker")
    p.add_argument(
        "--daemon",
        default=_env("DAEMON_ENDPOINT", default_daemon_endpoint()),
        help="daemon worker endpoint, ipc://PATH or tcp://HOST:PORT [RADIXKV_DAEMON_ENDPOINT]",
    )
    p.add_argument(
        "--model",
        default=_env("MODEL"),
        help="HF directory or GGUF file; default: embedded SmolLM2 [RADIXKV_MODEL]",
    )
    p.add_argument("--device", default=_env("DEVICE", "cpu"), help="cpu or cuda:N [RADIXKV_DEVICE]")
    p.add_argument(
        "--dtype", default=_env("DTYPE", "auto"), help="auto|float32|float16|bfloat16 [RADIXKV_DTYPE]"
    )
    p.add_argument(
        "--max-running",
        type=int,
        default=int(_env("MAX_RUNNING", "0") or 0),
        help="requests batched at once; 0 = by device: 16 on CPU, 256 on CUDA [RADIXKV_MAX_RUNNING]",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=int(_env("PREFILL_CHUNK", "0") or 0),
        help="prompt tokens per step; 0 = by device: 512 on CPU, 8192 on CUDA [RADIXKV_PREFILL_CHUNK]",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(_env("THREADS", "0") or 0),
        help="torch threads, 0 = default [RADIXKV_THREADS]",
    )
    p.add_argument(
        "--name",
        default=_env("WORKER_NAME", ""),
        help="shown in `cachemgr admin workers` [RADIXKV_WORKER_NAME]",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        default=_flag("RANDOM_WEIGHTS"),
        help="seeded random weights in the shape of --model's config.json [RADIXKV_RANDOM_WEIGHTS]",
    )
    p.add_argument(
        "--seed", type=int, default=int(_env("SEED", "0") or 0), help="random-weights seed [RADIXKV_SEED]"
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=_flag("CUDA_GRAPHS", True),
        help="decode through CUDA graphs on CUDA devices (default on) [RADIXKV_CUDA_GRAPHS]",
    )
    p.add_argument(
        "--max-graph-batch",
        type=int,
        default=int(_env("MAX_GRAPH_BATCH", "0") or 0),
        help="largest decode batch captured in a graph, 0 = --max-running [RADIXKV_MAX_GRAPH_BATCH]",
    )
    p.add_argument(
        "--log-steps",
        action="store_true",
        default=_flag("LOG_STEPS"),
        help="log each forward step's size and time [RADIXKV_LOG_STEPS]",
    )
    p.add_argument(
        "--mixed-steps",
        action=argparse.BooleanOptionalAction,
        default=None if _env("MIXED_STEPS") is None else _flag("MIXED_STEPS"),
        help="run decodes inside prefill steps (default: on for CPU, off for CUDA, where separate prefill and "
        "decode steps are faster) [RADIXKV_MIXED_STEPS]",
    )
    p.add_argument(
        "--extend-attention",
        choices=EXTEND_ATTENTION_CHOICES,
        default=_env("EXTEND_ATTENTION", "auto"),
        help="attention of the prefill CUDA graphs: auto (on Hopper: fa3 over prefix chunks for one sequence, "
        "else fa2 up to 128 new tokens and fa3 above), fa2, fa3 or fa3-split [RADIXKV_EXTEND_ATTENTION]",
    )
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"), help="[RADIXKV_LOG_LEVEL]")
    return p


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """Raises ValueError for invalid values."""
    return WorkerConfig(
        daemon_endpoint=args.daemon,
        model_path=Path(args.model) if args.model else None,
        device=args.device,
        dtype=args.dtype,
        max_running=args.max_running,
        prefill_chunk=args.prefill_chunk,
        threads=args.threads,
        name=args.name,
        random_weights=args.random_weights,
        seed=args.seed,
        cuda_graphs=args.cuda_graphs,
        max_graph_batch=args.max_graph_batch,
        log_steps=args.log_steps,
        mixed_steps=args.mixed_steps,
        extend_attention=args.extend_attention,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"computeworker: {exc}", file=sys.stderr)
        return 2
    from computeworker.bootstrap import build_runtime  # heavy imports (torch, the model) only now

    try:
        runtime = build_runtime(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"computeworker: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(runtime))


async def _serve(runtime: WorkerRuntime) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runtime.request_stop)
    try:
        return await runtime.run()
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
