"""The serve bench's stack: a supervised daemon + workers with their step logs, and the device-side sizing
(weights, KV per token, copy bandwidth, the KV budget that fits beside N workers' weights)."""

from __future__ import annotations

import argparse
import json
import re
import urllib.request
from pathlib import Path

from bench.random_model import LlamaShape
from cachemgr.launcher import StackConfig, Supervisor, free_port

_STEP = re.compile(r"step seqs=(\d+) tokens=(\d+) prefill=(\d+) cached=(\d+) ms=([\d.]+)")
# The worker's DEBUG trace of each step (computeworker.runtime): where the time from a Dispatch read to
# its messages handed to ZeroMQ went.
TRACE_FIELDS = ("dispatch", "step", "build", "forward", "sample", "handoff", "send")
_TRACE = re.compile(
    r"trace tokens=(\d+) cached=(\d+) " + " ".join(rf"{f}_ms=(-?[\d.]+)" for f in TRACE_FIELDS)
)
GIB = 1 << 30


def weight_bytes(shape: LlamaShape, read_only: bool = False) -> int:
    """bf16 bytes of the weights (read_only: what one forward reads; the embedding is gathered)."""
    layer = shape.hidden_size * (
        shape.num_attention_heads * shape.head_dim * 2
        + 2 * shape.num_key_value_heads * shape.head_dim
        + 3 * shape.intermediate_size
    )
    embed = shape.vocab_size * shape.hidden_size
    return 2 * (shape.num_hidden_layers * layer + embed * (1 if read_only else 2))


def kv_bytes_per_token(shape: LlamaShape, elem: int) -> int:
    return shape.num_hidden_layers * 2 * shape.num_key_value_heads * shape.head_dim * elem


class Stack:
    """A supervised stack with its worker logs; `steps(since)` parses --log-steps lines."""

    def __init__(
        self,
        args: argparse.Namespace,
        model_dir: Path,
        workers: int,
        budget: int,
        tmp: Path,
        extra_daemon_args: tuple[str, ...] = (),
    ) -> None:
        cuda = args.device.startswith("cuda")
        kv_dtype = "bfloat16" if cuda else "float32"
        tag = f"{workers}{''.join(a.strip('-')[0] for a in extra_daemon_args)}"
        self.log_dir = tmp / f"logs-{tag}"
        self.config = StackConfig(
            num_workers=workers,
            model=str(model_dir),
            http_port=free_port(),
            run_dir=tmp / f"run-{tag}",
            device=args.device,
            log_dir=self.log_dir,
            ready_timeout_s=600.0,
            daemon_args=(
                "--device", args.device, "--kv-dtype", kv_dtype, "--kv-budget", str(budget),
                "--max-queue", "100000", "--page-wait-timeout", "600", "--dispatch", args.dispatch,
                *extra_daemon_args,
            ),
            worker_args=(
                "--random-weights", "--dtype", kv_dtype, "--max-running", str(args.max_running),
                "--prefill-chunk", str(args.prefill_chunk), "--log-steps", "--log-level", "DEBUG",
                *(() if args.cuda_graphs else ("--no-cuda-graphs",)),
                *(() if args.mixed_steps is None else ("--mixed-steps" if args.mixed_steps else "--no-mixed-steps",)),
            ),
        )  # fmt: skip
        self.supervisor = Supervisor(self.config)
        self.workers = workers

    def __enter__(self) -> Stack:
        self.supervisor.start()
        self.supervisor.wait_ready(min_workers=self.workers)
        with urllib.request.urlopen(self.config.url + "/v1/models", timeout=10) as resp:
            self.model = json.loads(resp.read())["data"][0]["id"]
        return self

    def __exit__(self, *exc: object) -> None:
        self.supervisor.stop()

    def log_sizes(self) -> list[int]:
        return [(self.log_dir / f"worker-{i}.log").stat().st_size for i in range(self.workers)]

    def _log_since(self, i: int, offset: int) -> str:
        with open(self.log_dir / f"worker-{i}.log", "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def steps(self, since: list[int]) -> list[list[tuple[int, int, int, int, float]]]:
        """Per worker: (seqs, tokens, prefill, cached, ms) of every step logged after `since`."""
        out = []
        for i, offset in enumerate(since):
            text = self._log_since(i, offset)
            out.append([(int(a), int(b), int(c), int(d), float(e)) for a, b, c, d, e in _STEP.findall(text)])
        return out

    def traces(self, since: list[int]) -> list[tuple[int, int, dict[str, float]]]:
        """(tokens, cached, {field: ms}) of every worker step trace logged after `since`."""
        out = []
        for i, offset in enumerate(since):
            for m in _TRACE.findall(self._log_since(i, offset)):
                out.append((int(m[0]), int(m[1]), dict(zip(TRACE_FIELDS, map(float, m[2:]), strict=True))))
        return out


def step_summary(steps: list[tuple[int, int, int, int, float]]) -> dict:
    """One worker's logged steps: how many, their summed time, and the decode-only ones apart."""
    decode = [s for s in steps if s[2] == 0]
    return {
        "steps": len(steps),
        "step_ms_total": round(sum(s[4] for s in steps), 1),
        "decode_steps": len(decode),
        "decode_ms_mean": round(sum(s[4] for s in decode) / len(decode), 2) if decode else None,
        "decode_seqs_mean": round(sum(s[0] for s in decode) / len(decode), 1) if decode else None,
        "prefill_steps": len(steps) - len(decode),
        "prefill_ms_total": round(sum(s[4] for s in steps if s[2]), 1),
    }


def measure_copy_bandwidth(device: str) -> float | None:
    """Device-to-device copy, bytes read + written per second (the bandwidth ceiling); None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    rate = 2 * 20 * src.numel() / (start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return rate


def plan_memory(args: argparse.Namespace, shape: LlamaShape) -> tuple[int, int, int, str]:
    """(KV budget for 1 worker, for 2 workers, clients, card name) from the free device memory."""
    if not args.device.startswith("cuda"):
        return 256 << 20, 256 << 20, args.clients, "cpu"
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(args.device))
    reserve = weight_bytes(shape) + args.worker_reserve_gib * GIB
    budget1 = int(free - reserve - 2 * GIB)
    budget2 = int(free - 2 * reserve - 2 * GIB)
    per_client = kv_bytes_per_token(shape, 2) * args.rounds * (args.new_tokens + args.output_tokens)
    clients = max(1, min(args.clients, int(0.9 * budget1 // per_client)))
    return budget1, budget2, clients, torch.cuda.get_device_name(torch.device(args.device))
