"""The engine on a tiny random Llama (transformers' save_pretrained) over a real shm pool: chunked
prefill and cache hits reproduce the cold computation."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from computeworker.engine.engine import Engine, EngineConfig
from computeworker.engine.logits_processing import RowHistory, processed_logits
from computeworker.engine.prompt_scoring import SCORING_STEP_TOKENS
from computeworker.model.attention_torch import TorchAttention
from computeworker.model.batch import ForwardBatch
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.llama import LlamaModel
from computeworker.model.loader import load_model
from shared.ids import bytes_to_ids, ids_to_bytes
from shared.kv_layout import KVLayout
from shared.pool import MappedPool, create_pool, map_pool
from shared.protocol import (
    Commit,
    CommitAck,
    Dispatch,
    Finished,
    FinishReason,
    Generated,
    PageRequest,
    PagesGranted,
    PromptLogprobs,
    SamplingParams,
)

from .conftest import LetterTokenizer

PAGE = 4


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> LlamaModel:
    model, _ = load_model(tiny_llama_dir, torch.float32, "cpu", progress=False)
    return model


@pytest.fixture
def pool(tiny: LlamaModel) -> Iterator[MappedPool]:
    s = tiny.spec
    layout = KVLayout(s.num_layers, 64, PAGE, s.num_kv_heads, s.head_dim)
    owned = create_pool(layout, "shm", name=f"wm-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    mapped = map_pool(owned.descriptor())
    mapped.tensor.fill_(float("nan"))  # a read of a slot nobody wrote poisons the logits
    yield mapped
    mapped.close()
    owned.close()


class RecordingModel:
    """Passes through to the real model and keeps each step's logits."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.logits: list[torch.Tensor] = []

    def forward(
        self, batch: ForwardBatch, kv_pool: torch.Tensor, attention: TorchAttention, all_logits: bool = False
    ) -> torch.Tensor:
        out = self.model.forward(batch, kv_pool, attention, all_logits)
        self.logits.append(out.clone())
        return out


@dataclass
class MiniDaemon:
    """Plays the daemon's part for one engine: hands out pages from a free list, acks commits unchanged
    (or with the pages a previous request committed for the same tokens), collects outputs."""

    engine: Engine
    free: list[int]
    tree: dict[tuple[int, ...], int] = field(default_factory=dict)  # token prefix (full pages) -> page
    outputs: dict[bytes, list[int]] = field(default_factory=dict)
    frames: list[Generated] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # message type names, as sent
    prompt_frames: list[PromptLogprobs] = field(default_factory=list)
    finished: dict[bytes, Finished] = field(default_factory=dict)

    def dispatch(
        self,
        rid: bytes,
        prompt: list[int],
        sampling: SamplingParams,
        *,
        use_cache: bool = True,
        num_generated: int = 0,
    ) -> None:
        prefix: list[int] = []
        while use_cache and (len(prefix) + 1) * PAGE <= len(prompt):
            page = self.tree.get(tuple(prompt[: (len(prefix) + 1) * PAGE]))
            if page is None:
                break
            prefix.append(page)
        matched = len(prefix) * PAGE
        num_new = max(1, -(-(len(prompt) - matched) // PAGE))
        new = [self.free.pop(0) for _ in range(num_new)]
        self.outputs[rid] = []
        self.engine.add(
            Dispatch(
                rid,
                ids_to_bytes(prompt),
                matched,
                ids_to_bytes(prefix),
                ids_to_bytes(new),
                sampling,
                attempt=int(num_generated > 0),
                num_generated=num_generated,
            )
        )

    def _commit(self, tokens: list[int], pages: list[int]) -> list[int]:
        out = []
        for i, page in enumerate(pages):
            key = tuple(tokens[: (i + 1) * PAGE])
            out.append(self.tree.setdefault(key, page))
        return out

    def run(self) -> None:
        while True:
            messages = self.engine.take_messages()
            for msg in messages:
                self.order.append(type(msg).__name__)
                if isinstance(msg, PromptLogprobs):
                    self.prompt_frames.append(msg)
                if isinstance(msg, PageRequest):
                    grant = [self.free.pop(0) for _ in range(msg.num_pages)]
                    self.engine.on_pages_granted(PagesGranted(msg.request_id, ids_to_bytes(grant)))
                elif isinstance(msg, Commit):
                    pages = self._commit(
                        bytes_to_ids(msg.tokens).tolist(), bytes_to_ids(msg.page_ids).tolist()
                    )
                    self.engine.on_commit_ack(CommitAck(msg.request_id, ids_to_bytes(pages)))
                elif isinstance(msg, Generated):
                    self.outputs[msg.request_id] += bytes_to_ids(msg.tokens).tolist()
                    self.frames.append(msg)
                elif isinstance(msg, Finished):
                    self._commit(bytes_to_ids(msg.tokens).tolist(), bytes_to_ids(msg.page_ids).tolist())
                    self.finished[msg.request_id] = msg
            if self.engine.has_work():
                self.engine.step()
            elif not messages:  # an ack may have released a Finished: drain before leaving
                return


def _mini(
    tiny: LlamaModel, pool: MappedPool, prefill_chunk: int = 64, eos: tuple[int, ...] = ()
) -> tuple[MiniDaemon, RecordingModel]:
    rec = RecordingModel(tiny)
    config = EngineConfig(
        PAGE, tiny.spec.max_position_embeddings, eos, max_running=8, prefill_chunk=prefill_chunk
    )
    engine = Engine(rec, TorchAttention(), pool.tensor, LetterTokenizer(), config)
    return MiniDaemon(engine, list(range(1, 64))), rec


PROMPT = [5, 17, 99, 3, 250, 41, 8, 8, 130, 77, 12, 200, 64]  # 13 tokens: 3 full pages + 1
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def test_three_prefill_chunks_give_the_logits_of_one(tiny: LlamaModel, pool: MappedPool) -> None:
    one, rec_one = _mini(tiny, pool)
    one.dispatch(b"1" * 16, PROMPT[:12], GREEDY)
    one.run()
    three, rec_three = _mini(tiny, pool, prefill_chunk=4)
    three.free = list(range(40, 64))
    three.dispatch(b"3" * 16, PROMPT[:12], GREEDY)
    three.run()
    assert len(rec_three.logits) == len(rec_one.logits) + 2  # the prompt took 3 steps instead of 1
    torch.testing.assert_close(rec_three.logits[2], rec_one.logits[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(rec_three.logits[3:], rec_one.logits[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert three.outputs[b"3" * 16] == one.outputs[b"1" * 16]
    assert len(one.outputs[b"1" * 16]) == 10


def test_partial_and_full_cache_hits_equal_the_cold_output(tiny: LlamaModel, pool: MappedPool) -> None:
    mini, _ = _mini(tiny, pool)
    mini.dispatch(b"c" * 16, PROMPT, GREEDY, use_cache=False)
    mini.run()
    cold = mini.outputs[b"c" * 16]
    fin = mini.finished[b"c" * 16]
    # 13 prompt + 9 fed output tokens = 22 positions written: 5 full pages committed at finish
    assert fin.reason is FinishReason.LENGTH and len(bytes_to_ids(fin.page_ids)) == 5

    mini.dispatch(b"p" * 16, PROMPT, GREEDY)  # 12 of 13 cached: only the last token is computed
    assert mini.engine.get(b"p" * 16).matched_len == 12  # type: ignore[union-attr]
    mini.run()
    assert mini.outputs[b"p" * 16] == cold

    full_prompt = PROMPT + cold[:3]  # 16 tokens, all cached by the cold run's final commit
    mini.dispatch(b"f" * 16, full_prompt, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    assert mini.engine.get(b"f" * 16).matched_len == 16  # type: ignore[union-attr]
    mini.run()
    assert mini.outputs[b"f" * 16] == cold[3:]

    fresh, _ = _mini(tiny, pool)
    fresh.free = list(range(40, 64))
    fresh.dispatch(b"x" * 16, [*PROMPT[:8], 1, 2, 3], GREEDY, use_cache=False)
    fresh.run()
    mini.dispatch(b"y" * 16, [*PROMPT[:8], 1, 2, 3], GREEDY)  # shares 2 pages, new suffix
    assert mini.engine.get(b"y" * 16).matched_len == 8  # type: ignore[union-attr]
    mini.run()
    assert mini.outputs[b"y" * 16] == fresh.outputs[b"x" * 16]


def test_batched_requests_match_each_alone_and_seeds_reproduce(tiny: LlamaModel, pool: MappedPool) -> None:
    seeded = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)
    alone = {}
    for rid, prompt, params in [(b"a" * 16, PROMPT, GREEDY), (b"b" * 16, PROMPT[3:9], seeded)]:
        mini, _ = _mini(tiny, pool)
        mini.dispatch(rid, prompt, params)
        mini.run()
        alone[rid] = mini.outputs[rid]
    mini, _ = _mini(tiny, pool, prefill_chunk=5)
    mini.dispatch(b"a" * 16, PROMPT, GREEDY)
    mini.engine.step()  # "a" is mid-prefill when "b" arrives: mixed steps follow
    mini.dispatch(b"b" * 16, PROMPT[3:9], seeded)
    mini.run()
    assert mini.outputs == alone


def test_redispatched_seeded_request_continues_its_stream(tiny: LlamaModel, pool: MappedPool) -> None:
    seeded = SamplingParams(temperature=1.5, seed=21, max_tokens=8, ignore_eos=True)
    mini, _ = _mini(tiny, pool)
    mini.dispatch(b"s" * 16, PROMPT, seeded)
    mini.run()
    whole = mini.outputs[b"s" * 16]
    assert len(set(whole)) > 1  # really sampled, not a constant
    # As the daemon resumes it after a worker died with 3 tokens streamed: prompt + those 3, 5 to go.
    resumed, _ = _mini(tiny, pool)
    rest = SamplingParams(temperature=1.5, seed=21, max_tokens=5, ignore_eos=True)
    resumed.dispatch(b"s" * 16, PROMPT + whole[:3], rest, num_generated=3)
    resumed.run()
    assert resumed.outputs[b"s" * 16] == whole[3:]


def test_logprobs_travel_with_their_tokens(tiny: LlamaModel, pool: MappedPool) -> None:
    """Asked for k = 3: every Generated frame carries each token's log-probability under the model (the
    log-softmax of that step's raw logits, whatever the temperature) and the 3 most likely tokens."""
    mini, rec = _mini(tiny, pool)
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=6, ignore_eos=True, logprobs=3)
    mini.dispatch(b"l" * 16, PROMPT, params)
    mini.run()
    tokens = mini.outputs[b"l" * 16]
    got = np.concatenate([np.frombuffer(f.logprobs, "<f4") for f in mini.frames])
    top_ids = np.concatenate([np.frombuffer(f.top_ids, "<i4") for f in mini.frames]).reshape(-1, 3)
    top_lp = np.concatenate([np.frombuffer(f.top_logprobs, "<f4") for f in mini.frames]).reshape(-1, 3)
    assert len(got) == len(tokens) == 6
    steps = [
        logits[-1] for logits in rec.logits
    ]  # one sampled row per step (the prompt's last token, then decodes)
    for i, token in enumerate(tokens):
        want = torch.log_softmax(steps[i].float(), dim=-1)
        assert got[i] == pytest.approx(float(want[token]), abs=1e-5)
        assert top_ids[i].tolist() == torch.topk(want, 3).indices.tolist()
        assert np.allclose(top_lp[i], torch.topk(want, 3).values.numpy(), atol=1e-5)
    plain, _ = _mini(tiny, pool)  # without logprobs: the same tokens, frames without them
    plain.dispatch(b"l" * 16, PROMPT, SamplingParams(temperature=0.7, seed=5, max_tokens=6, ignore_eos=True))
    plain.run()
    assert plain.outputs[b"l" * 16] == tokens
    assert all(f.logprobs == f.top_ids == f.top_logprobs == b"" for f in plain.frames)


def test_penalties_see_every_generated_token_and_survive_a_redispatch(
    tiny: LlamaModel, pool: MappedPool
) -> None:
    """Greedy with penalties and a bias: each token is the argmax of that step's raw logits processed over
    the tokens generated before it; resumed after 3 tokens, the request continues the same way."""
    params = SamplingParams(
        temperature=0.0,
        max_tokens=8,
        ignore_eos=True,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        repetition_penalty=1.3,
        logit_bias={PROMPT[0]: 2.0},
    )
    mini, rec = _mini(tiny, pool)
    mini.dispatch(b"p" * 16, PROMPT, params)
    mini.run()
    tokens = mini.outputs[b"p" * 16]
    assert len(tokens) == 8
    prompt_set = np.unique(np.array(PROMPT))
    for i, token in enumerate(tokens):
        history = RowHistory(generated=tokens[:i], prompt_tokens=prompt_set)
        assert token == int(torch.argmax(processed_logits(rec.logits[i][-1:], [params], [history])))
    resumed, _ = _mini(tiny, pool)
    rest = msgspec.structs.replace(params, max_tokens=5)
    resumed.dispatch(b"p" * 16, PROMPT + tokens[:3], rest, num_generated=3)
    resumed.run()
    assert resumed.outputs[b"p" * 16] == tokens[3:]


def test_min_tokens_holds_back_eos_and_stop_tokens(tiny: LlamaModel, pool: MappedPool) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    probe, _ = _mini(tiny, pool)
    probe.dispatch(b"e" * 16, PROMPT, greedy)
    probe.run()
    first = probe.outputs[b"e" * 16][0]
    mini, _ = _mini(tiny, pool, eos=(first,))  # the model's first choice is now EOS: it stops at once
    mini.dispatch(b"e" * 16, PROMPT, greedy)
    mini.run()
    assert mini.outputs[b"e" * 16] == []
    assert mini.finished[b"e" * 16].reason is FinishReason.STOP
    held, _ = _mini(tiny, pool, eos=(first,))
    held.dispatch(
        b"e" * 16, PROMPT, msgspec.structs.replace(greedy, min_tokens=3, stop_token_ids=[first + 1])
    )
    held.run()
    out = held.outputs[b"e" * 16]
    assert len(out) >= 3 and not {first, first + 1} & set(out[:3])


@pytest.mark.parametrize("prefill_chunk", [64, 5])
def test_prompt_logprobs_score_every_prompt_token(
    tiny: LlamaModel, pool: MappedPool, prefill_chunk: int
) -> None:
    """Each prompt token t >= 1 gets log-softmax(logits at t - 1)[token t] and the top 2 there, computed
    in one chunk or in chunks of 5; the frame goes out before the first generated token."""
    mini, rec = _mini(tiny, pool, prefill_chunk=prefill_chunk)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    mini.dispatch(b"q" * 16, PROMPT, params, use_cache=False)
    mini.run()
    (frame,) = mini.prompt_frames
    assert mini.order.index("PromptLogprobs") < mini.order.index("Generated")
    got = np.frombuffer(frame.logprobs, "<f4")
    top_ids = np.frombuffer(frame.top_ids, "<i4").reshape(-1, 2)
    scratch = torch.zeros_like(pool.tensor)  # a cold pass over the whole prompt, outside the engine
    batch = build_forward_batch([SeqChunk(PROMPT, 0, list(range(4)))], PAGE, "cpu")
    reference = torch.log_softmax(tiny.forward(batch, scratch, TorchAttention(), True).float(), dim=-1)
    assert len(got) == len(PROMPT) - 1
    for t in range(1, len(PROMPT)):
        assert got[t - 1] == pytest.approx(float(reference[t - 1, PROMPT[t]]), abs=1e-4)
        assert top_ids[t - 1].tolist() == torch.topk(reference[t - 1], 2).indices.tolist()
    assert len(mini.outputs[b"q" * 16]) == 2  # generation goes on as usual
    assert all(logits.shape[0] <= SCORING_STEP_TOKENS for logits in rec.logits)


def test_prompt_logprobs_refuse_a_cached_prefix(tiny: LlamaModel, pool: MappedPool) -> None:
    mini, _ = _mini(tiny, pool)
    mini.dispatch(b"a" * 16, PROMPT, GREEDY)
    mini.run()
    with pytest.raises(ValueError, match="whole prompt"):
        mini.dispatch(b"b" * 16, PROMPT, msgspec.structs.replace(GREEDY, prompt_logprobs=0))
