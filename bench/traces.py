"""Generator of multi-turn chat and agent traces in the Mooncake trace format (one JSON object per line).

Each line: ``timestamp`` (ms), ``input_length`` and ``output_length`` (tokens), ``hash_ids`` (one id per
block of ``block_tokens`` tokens; equal leading ids = shared prefix). The traffic mixes what production
chat and agent serving sees:

- a few system prompts with Zipf popularity (a handful are very hot), some long (tool definitions);
- sessions arrive in bursts: a Poisson process whose rate switches between a busy and a quiet level
  (exponential dwell times), so the cache sees load swings;
- chat sessions with heavy-tailed turn counts, and a per-turn chance that the user walks away, so many
  conversations are abandoned after a turn or two; log-normal think time (seconds to minutes, with
  occasional long pauses);
- agent sessions: many quick turns, each adding a tool result to a growing context; most results are
  short, some are long (file contents, search results);
- one-off requests (API traffic, summarisation, RAG): a shared system prompt plus a long unique body
  that is never seen again. Their unique suffixes are what pollutes an LRU cache.

The ``multiturn`` family (``--family multiturn``, :func:`generate_multiturn`) is the regime where LRU
collapses: many concurrent clients (SGLang's bench_multiturn shape) each running conversations whose turns
come back only after every other client has had a turn, so a session's reuse distance exceeds the cache.

    python -m bench.traces --out trace.jsonl [--sessions 2000] [--seed 0] [--agent-share 0.3] ...
    python -m bench.traces --family multiturn --out trace.jsonl [--clients 256] [--rounds 5] ...
    python -m bench.traces --family revisit --out trace.jsonl [--requests 6000] [--revisit-prob 0.7] ...

The ``revisit`` family (bench.traces_revisit) brings conversations back at random, with no session
structure: the regime where holding on to older conversations can only cost hits.
"""

from __future__ import annotations

import argparse
import heapq
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from bench.traces_revisit import RevisitConfig, generate_revisit


@dataclass(frozen=True, slots=True)
class TraceConfig:
    sessions: int = 2000
    seed: int = 0
    block_tokens: int = 512
    num_system_prompts: int = 40
    zipf_a: float = 1.2  # system prompt popularity
    system_blocks: tuple[int, int] = (2, 16)  # uniform range of system prompt length, blocks
    arrival_per_s: float = 2.0  # mean new sessions per second
    burst_factor: float = 1.0  # busy-period rate / quiet-period rate (1 = plain Poisson)
    burst_dwell_s: float = 120.0  # mean length of a busy or quiet period
    agent_share: float = 0.3
    oneoff_share: float = 0.0  # share of sessions that are a single request with a long unique body
    oneoff_blocks_median: float = 6.0  # log-normal (sigma 0.8) body length of one-off requests
    chat_turns_mean: float = 4.0  # chat turns ~ 1 + lognormal-ish tail around this mean
    abandon_prob: float = 0.0  # chance, after each chat turn, that the user never comes back
    think_s_median: float = 45.0
    agent_turns_mean: float = 12.0
    agent_think_s_median: float = 4.0
    tool_long_prob: float = 0.0  # chance that an agent's tool result is long
    tool_long_blocks_median: float = 8.0  # log-normal (sigma 0.7) length of a long tool result
    user_blocks: tuple[int, int] = (1, 3)
    output_blocks: tuple[int, int] = (0, 2)

    def __post_init__(self) -> None:
        shares = (self.agent_share, self.oneoff_share, self.abandon_prob, self.tool_long_prob)
        if self.sessions < 1 or self.block_tokens < 1 or not all(0.0 <= s <= 1.0 for s in shares):
            raise ValueError("sessions, block_tokens must be positive and shares/probabilities in [0, 1]")
        if self.agent_share + self.oneoff_share > 1.0 or self.burst_factor < 1.0:
            raise ValueError("agent_share + oneoff_share must be <= 1 and burst_factor >= 1")


def _turns(rng: np.random.Generator, mean: float) -> int:
    # Heavy tail: log-normal with sigma 1, shifted so that the minimum is one turn.
    sigma = 1.0
    mu = np.log(max(mean - 1.0, 0.1)) - sigma**2 / 2
    return 1 + int(rng.lognormal(mu, sigma))


def _arrivals(rng: np.random.Generator, cfg: TraceConfig) -> list[float]:
    """Session start times (s): Poisson with a rate that alternates busy / quiet (same mean rate)."""
    quiet = 2.0 * cfg.arrival_per_s / (1.0 + cfg.burst_factor)
    rates = (quiet * cfg.burst_factor, quiet)
    out: list[float] = []
    t, busy, switch = 0.0, 0, rng.exponential(cfg.burst_dwell_s)
    while len(out) < cfg.sessions:
        t += rng.exponential(1.0 / rates[busy])
        while t > switch:  # memoryless: restart the wait at the switch with the new rate
            t = switch + rng.exponential(1.0 / rates[1 - busy])
            busy = 1 - busy
            switch += rng.exponential(cfg.burst_dwell_s)
        out.append(t)
    return out


def _system_prompts(
    rng: np.random.Generator, next_id: Iterator[int], count: int, blocks: tuple[int, int], zipf_a: float
) -> tuple[list[list[int]], np.ndarray]:
    """``count`` system prompts of uniform length in ``blocks`` (fresh ids), and their Zipf popularity."""
    lo, hi = blocks
    systems = [[next(next_id) for _ in range(int(rng.integers(lo, hi + 1)))] for _ in range(count)]
    ranks = np.arange(1, count + 1, dtype=np.float64)
    return systems, ranks**-zipf_a / np.sum(ranks**-zipf_a)


def generate(cfg: TraceConfig) -> list[dict[str, object]]:
    """All requests of the trace, sorted by timestamp."""
    rng = np.random.default_rng(cfg.seed)
    next_id = iter(range(1, 2**31 - 1))
    systems, popularity = _system_prompts(rng, next_id, cfg.num_system_prompts, cfg.system_blocks, cfg.zipf_a)
    # (t_s, session, context, turns left, turn, kind) with kind 0 chat, 1 agent, 2 one-off
    events: list[tuple[float, int, list[int], int, int, int]] = []
    for session, start in enumerate(_arrivals(rng, cfg)):
        u = rng.random()
        kind = 1 if u < cfg.agent_share else 2 if u < cfg.agent_share + cfg.oneoff_share else 0
        system = systems[int(rng.choice(cfg.num_system_prompts, p=popularity))]
        turns = 1 if kind == 2 else _turns(rng, cfg.agent_turns_mean if kind == 1 else cfg.chat_turns_mean)
        heapq.heappush(events, (start, session, list(system), turns, 0, kind))
    out: list[dict[str, object]] = []
    while events:
        t, session, context, turns_left, turn, kind = heapq.heappop(events)
        if kind == 2:
            new_blocks = 1 + int(rng.lognormal(np.log(cfg.oneoff_blocks_median), 0.8))
        elif kind == 1 and turn:
            long = rng.random() < cfg.tool_long_prob
            new_blocks = 1 + int(rng.lognormal(np.log(cfg.tool_long_blocks_median), 0.7)) if long else 1
        else:
            new_blocks = int(rng.integers(cfg.user_blocks[0], cfg.user_blocks[1] + 1))
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
        abandoned = kind == 0 and rng.random() < cfg.abandon_prob
        if turns_left > 1 and not abandoned:
            median = cfg.agent_think_s_median if kind == 1 else cfg.think_s_median
            think = float(rng.lognormal(np.log(median), 1.0))
            context = prompt + [next(next_id) for _ in range(out_blocks)]
            heapq.heappush(events, (t + think, session, context, turns_left - 1, turn + 1, kind))
    out.sort(key=lambda r: r["timestamp"])  # type: ignore[arg-type,return-value]
    return out


@dataclass(frozen=True, slots=True)
class MultiturnConfig:
    """Many concurrent clients, each running conversations back to back (SGLang's bench_multiturn shape).

    Turns are counted in tokens, so a block is shared with the next turn only while it was full: each turn
    adds ``user_tokens`` (uniform range) to the context and its answer ``output_tokens``; the prompt's
    partial last block changes and gets a new id next turn, as in real Mooncake traces. Chat turns come
    back after a log-normal think time (which includes the answer's latency); agent clients take many quick
    turns. After each turn the user may walk away; a client then starts a new conversation after a pause.
    """

    sessions: int = 1200  # conversations in the whole trace
    seed: int = 0
    block_tokens: int = 512
    clients: int = 256  # concurrent client loops
    rounds: int = 5  # turns of a chat conversation nobody abandons
    num_system_prompts: int = 4
    zipf_a: float = 1.5
    system_blocks: tuple[int, int] = (1, 2)
    user_tokens: tuple[int, int] = (384, 640)  # added per turn (bench_multiturn: 512)
    output_tokens: int = 64
    think_s_median: float = 20.0
    abandon_prob: float = 0.1  # chance, after each turn, that the conversation ends early
    agent_share: float = 0.2  # share of clients that are agents
    agent_rounds: int = 10
    agent_think_s_median: float = 3.0
    session_gap_s_median: float = 10.0  # a client's pause before its next conversation
    ramp_s: float = 30.0  # clients start at Poisson times spread over about this long

    def __post_init__(self) -> None:
        if min(self.sessions, self.block_tokens, self.clients, self.rounds, self.agent_rounds) < 1:
            raise ValueError("sessions, block_tokens, clients, rounds and agent_rounds must be positive")
        if not (0.0 <= self.abandon_prob <= 1.0 and 0.0 <= self.agent_share <= 1.0):
            raise ValueError("abandon_prob and agent_share must be in [0, 1]")


def generate_multiturn(cfg: MultiturnConfig) -> list[dict[str, object]]:
    """All requests of a multiturn trace, sorted by timestamp."""
    rng = np.random.default_rng(cfg.seed)
    next_id = iter(range(1, 2**31 - 1))
    systems, popularity = _system_prompts(rng, next_id, cfg.num_system_prompts, cfg.system_blocks, cfg.zipf_a)
    bt = cfg.block_tokens
    is_agent = rng.random(cfg.clients) < cfg.agent_share
    starts = np.cumsum(rng.exponential(cfg.ramp_s / cfg.clients, cfg.clients))
    events = [(float(t), client) for client, t in enumerate(starts)]
    heapq.heapify(events)
    # client -> [full-block ids of the context, context tokens, turns left]; None between conversations
    state: list[list | None] = [None] * cfg.clients
    started = 0
    out: list[dict[str, object]] = []
    while events:
        t, client = heapq.heappop(events)
        agent = bool(is_agent[client])
        cur = state[client]
        if cur is None:
            if started == cfg.sessions:
                continue
            started += 1
            system = systems[int(rng.choice(cfg.num_system_prompts, p=popularity))]
            cur = state[client] = [list(system), len(system) * bt, cfg.agent_rounds if agent else cfg.rounds]
        ids, context_tokens, turns_left = cur
        prompt_tokens = context_tokens + int(rng.integers(cfg.user_tokens[0], cfg.user_tokens[1] + 1))
        num_blocks = -(-prompt_tokens // bt)
        prompt = ids + [next(next_id) for _ in range(num_blocks - len(ids))]
        out.append(
            {
                "timestamp": round(t * 1000),
                "input_length": prompt_tokens,
                "output_length": cfg.output_tokens,
                "hash_ids": prompt,
            }
        )
        if turns_left > 1 and rng.random() >= cfg.abandon_prob:
            cur[:] = [prompt[: prompt_tokens // bt], prompt_tokens + cfg.output_tokens, turns_left - 1]
            median = cfg.agent_think_s_median if agent else cfg.think_s_median
            heapq.heappush(events, (t + float(rng.lognormal(np.log(median), 0.5)), client))
        else:
            state[client] = None
            gap = float(rng.lognormal(np.log(cfg.session_gap_s_median), 1.0))
            heapq.heappush(events, (t + gap, client))
    out.sort(key=lambda r: r["timestamp"])  # type: ignore[arg-type,return-value]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", choices=("generic", "multiturn", "revisit"), default="generic")
    family = parser.parse_known_args(argv)[0].family
    config_cls = {"multiturn": MultiturnConfig, "revisit": RevisitConfig}.get(family, TraceConfig)
    for name, field in config_cls.__dataclass_fields__.items():
        if isinstance(field.default, (int, float)) and not isinstance(field.default, bool):
            parser.add_argument(
                "--" + name.replace("_", "-"), type=type(field.default), default=field.default
            )
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    args.pop("family")
    if family == "multiturn":
        rows = generate_multiturn(MultiturnConfig(**args))
    elif family == "revisit":
        rows = generate_revisit(RevisitConfig(**args))
    else:
        rows = generate(TraceConfig(**args))
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} requests to {out}")


if __name__ == "__main__":
    main()
