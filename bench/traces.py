"""Generator of multi-turn chat and agent traces in the Mooncake trace format (one JSON object per line).

Each line: ``timestamp`` (ms), ``input_length`` and ``output_length`` (tokens), ``hash_ids`` (one id per
block of ``block_tokens`` tokens; equal leading ids = shared prefix). The traffic mixes what production
chat and agent serving sees:

- a few system prompts with Zipf popularity (a handful are very hot), some long (tool definitions);
- chat sessions arriving as a Poisson process, with heavy-tailed turn counts (most sessions are short,
  a few very long), so many conversations are abandoned after a turn or two;
- think time between turns: log-normal (seconds to minutes) for people, short for tool-calling agents;
- agent sessions: many turns, each adding a small tool result to a growing context.

    python -m bench.traces --out trace.jsonl [--sessions 2000] [--seed 0] [--agent-share 0.3] ...
"""

from __future__ import annotations

import argparse
import heapq
import json
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class TraceConfig:
    sessions: int = 2000
    seed: int = 0
    block_tokens: int = 512
    num_system_prompts: int = 40
    zipf_a: float = 1.2  # system prompt popularity
    system_blocks: tuple[int, int] = (2, 16)  # uniform range of system prompt length, blocks
    arrival_per_s: float = 2.0  # new sessions per second
    agent_share: float = 0.3
    chat_turns_mean: float = 4.0  # chat turns ~ 1 + lognormal-ish tail around this mean
    think_s_median: float = 45.0
    agent_turns_mean: float = 12.0
    agent_think_s_median: float = 4.0
    user_blocks: tuple[int, int] = (1, 3)
    output_blocks: tuple[int, int] = (0, 2)

    def __post_init__(self) -> None:
        if self.sessions < 1 or self.block_tokens < 1 or not 0.0 <= self.agent_share <= 1.0:
            raise ValueError("sessions, block_tokens must be positive and agent_share in [0, 1]")


def _turns(rng: np.random.Generator, mean: float) -> int:
    # Heavy tail: log-normal with sigma 1, shifted so that the minimum is one turn.
    sigma = 1.0
    mu = np.log(max(mean - 1.0, 0.1)) - sigma**2 / 2
    return 1 + int(rng.lognormal(mu, sigma))


def generate(cfg: TraceConfig) -> list[dict[str, object]]:
    """All requests of the trace, sorted by timestamp."""
    rng = np.random.default_rng(cfg.seed)
    next_id = iter(range(1, 2**31 - 1))
    lo, hi = cfg.system_blocks
    systems = [
        [next(next_id) for _ in range(int(rng.integers(lo, hi + 1)))] for _ in range(cfg.num_system_prompts)
    ]
    ranks = np.arange(1, cfg.num_system_prompts + 1, dtype=np.float64)
    popularity = ranks**-cfg.zipf_a / np.sum(ranks**-cfg.zipf_a)
    events: list[tuple[float, int, list[int], int, int, bool]] = []  # (t_s, session, context, turns left)
    start = 0.0
    for session in range(cfg.sessions):
        start += rng.exponential(1.0 / cfg.arrival_per_s)
        agent = bool(rng.random() < cfg.agent_share)
        system = systems[int(rng.choice(cfg.num_system_prompts, p=popularity))]
        turns = _turns(rng, cfg.agent_turns_mean if agent else cfg.chat_turns_mean)
        heapq.heappush(events, (start, session, list(system), turns, 0, agent))
    out: list[dict[str, object]] = []
    while events:
        t, session, context, turns_left, turn, agent = heapq.heappop(events)
        new_blocks = 1 if agent and turn else int(rng.integers(cfg.user_blocks[0], cfg.user_blocks[1] + 1))
        prompt = context + [next(next_id) for _ in range(new_blocks)]
        out_blocks = int(rng.integers(cfg.output_blocks[0], cfg.output_blocks[1] + 1))
        tail = int(rng.integers(0, cfg.block_tokens))  # the last block is rarely full
        out.append(
            {
                "timestamp": round(t * 1000),
                "input_length": len(prompt) * cfg.block_tokens - tail,
                "output_length": max(1, out_blocks * cfg.block_tokens),
                "hash_ids": prompt,
            }
        )
        if turns_left > 1:
            median = cfg.agent_think_s_median if agent else cfg.think_s_median
            think = float(rng.lognormal(np.log(median), 1.0))
            context = prompt + [next(next_id) for _ in range(out_blocks)]
            heapq.heappush(events, (t + think, session, context, turns_left - 1, turn + 1, agent))
    out.sort(key=lambda r: r["timestamp"])  # type: ignore[arg-type,return-value]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    for name, field in TraceConfig.__dataclass_fields__.items():
        if isinstance(field.default, (int, float)) and not isinstance(field.default, bool):
            parser.add_argument(
                "--" + name.replace("_", "-"), type=type(field.default), default=field.default
            )
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    cfg = TraceConfig(**{k: v for k, v in args.items()})
    rows = generate(cfg)
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} requests to {out}")


if __name__ == "__main__":
    main()
