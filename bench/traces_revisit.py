"""The ``revisit`` trace family: conversations that come back at random, with no session structure.

Each request either starts a new conversation (a Zipf-popular system prompt plus a few blocks of its
own) or, with probability ``revisit_prob``, continues one drawn uniformly from the ``live`` most recently
started conversations, appending a turn. The oldest conversation leaves the live set when a new one
starts. Every live conversation is as likely to come back as any other, whatever its age or history: the
independent-reference regime, where recency is the only signal and a policy that holds on to older
conversations at the expense of new ones (ghost's demotion) can only lose hits. It is in the evaluation to
bound that loss; it is not what chat traffic looks like (bench.traces covers that).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class RevisitConfig:
    requests: int = 6000
    seed: int = 0
    block_tokens: int = 512
    revisit_prob: float = 0.7
    live: int = 1000  # conversations that can come back
    num_system_prompts: int = 30
    zipf_a: float = 1.2
    system_blocks: tuple[int, int] = (2, 12)
    first_blocks: tuple[int, int] = (1, 20)  # a new conversation's own blocks
    turn_blocks: tuple[int, int] = (1, 4)  # blocks a returning turn appends
    mean_interarrival_ms: float = 150.0

    def __post_init__(self) -> None:
        if min(self.requests, self.block_tokens, self.live, self.num_system_prompts) < 1:
            raise ValueError("requests, block_tokens, live and num_system_prompts must be positive")
        if not 0.0 <= self.revisit_prob <= 1.0:
            raise ValueError("revisit_prob must be in [0, 1]")


def generate_revisit(cfg: RevisitConfig) -> list[dict[str, object]]:
    """All requests of a revisit trace, in timestamp order."""
    rng = np.random.default_rng(cfg.seed)
    next_id = 1

    def new_ids(n: int) -> list[int]:
        nonlocal next_id
        next_id += n
        return list(range(next_id - n, next_id))

    systems = [new_ids(int(rng.integers(cfg.system_blocks[0], cfg.system_blocks[1] + 1))) for _ in range(cfg.num_system_prompts)]  # fmt: skip
    weights = 1.0 / np.arange(1, cfg.num_system_prompts + 1) ** cfg.zipf_a
    popularity = weights / weights.sum()
    live: list[list[int]] = []
    t = 0.0
    out: list[dict[str, object]] = []
    for _ in range(cfg.requests):
        t += float(rng.exponential(cfg.mean_interarrival_ms))
        if live and rng.random() < cfg.revisit_prob:
            ids = live[int(rng.integers(len(live)))]
            ids.extend(new_ids(int(rng.integers(cfg.turn_blocks[0], cfg.turn_blocks[1] + 1))))
        else:
            system = systems[int(rng.choice(cfg.num_system_prompts, p=popularity))]
            ids = system + new_ids(int(rng.integers(cfg.first_blocks[0], cfg.first_blocks[1] + 1)))
            live.append(ids)
            if len(live) > cfg.live:
                live.pop(0)
        out.append(
            {
                "timestamp": round(t),
                "input_length": len(ids) * cfg.block_tokens - int(rng.integers(0, cfg.block_tokens)),
                "output_length": int(rng.integers(16, 512)),
                "hash_ids": list(ids),
            }
        )
    return out
