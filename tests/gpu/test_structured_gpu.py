"""Structured output on CUDA: xgrammar's mask kernel on bf16 logits masks exactly what the CPU path
masks, and a random-weight model decoding through the CUDA runner (decode graphs) under a regex emits
only matching text, ending with EOS."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bench.random_model import write_model_dir
from computeworker.engine.engine import Engine, EngineConfig
from computeworker.engine.structured import StructuredDecoding
from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.cuda_runner import CudaModelRunner
from computeworker.model.random_weights import random_model
from shared.ids import bytes_to_ids, ids_to_bytes
from shared.protocol import (
    Commit,
    CommitAck,
    Dispatch,
    Finished,
    FinishReason,
    Generated,
    SamplingParams,
    StructuredOutput,
)
from tests.gpu.test_cuda_runner import PAGE, SHAPE

pytestmark = pytest.mark.gpu

EOS = SHAPE.vocab_size - 1
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"
VOCAB = [CHARS[i % len(CHARS)] for i in range(EOS)] + ["</s>"]
PATTERN = "[a-f]{2,5}-[0-9]{3}"


class _NoStops:
    def detokenizer(self, prompt: list[int]) -> object:
        raise AssertionError("no stop strings here")


@pytest.fixture(scope="module")
def grammars() -> StructuredDecoding:
    return StructuredDecoding.for_vocabulary(VOCAB, [EOS])


def test_the_cuda_mask_equals_the_cpu_mask(grammars: StructuredDecoding) -> None:
    spec = StructuredOutput("regex", PATTERN)
    states = [grammars.start(spec), None, grammars.start(spec, [0, 1])]  # "ab" accepted
    logits = torch.randn(3, SHAPE.vocab_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    on_gpu = grammars.mask(logits.cuda(), states, owned=False)[0].cpu()
    on_cpu = StructuredDecoding.for_vocabulary(VOCAB, [EOS]).mask(logits.float(), states, owned=False)[0]
    assert torch.equal(on_gpu, on_cpu)
    assert torch.equal(on_gpu[1], logits[1].float())  # the free row untouched
    allowed = [{VOCAB[i] for i in torch.nonzero(row > -torch.inf).flatten().tolist()} for row in on_gpu]
    assert allowed[0] == set("abcdef") and allowed[2] == set("abcdef-")


def test_decoding_through_the_cuda_runner_matches_the_regex(
    tmp_path: Path, grammars: StructuredDecoding
) -> None:
    model, spec = random_model(write_model_dir(tmp_path, SHAPE), torch.bfloat16, "cuda", seed=7)
    attn = FlashInferAttention(
        AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim, PAGE), device="cuda"
    )
    pool = torch.zeros((2, 64, 2, PAGE, 2, 128), dtype=torch.bfloat16, device="cuda")
    runner = CudaModelRunner(model, max_graph_batch=8)
    runner.bind(pool, attn)
    config = EngineConfig(PAGE, spec.max_position_embeddings, (EOS,), max_running=8, prefill_chunk=8192)
    engine = Engine(runner, attn, pool, _NoStops(), config, structured=grammars)  # type: ignore[arg-type]
    for i in range(4):
        sampling = SamplingParams(
            temperature=0.0 if i < 2 else 1.0,
            seed=i,
            max_tokens=24,
            structured=StructuredOutput("regex", PATTERN),
        )
        prompt = list(range(100 + 40 * i, 140 + 40 * i))
        pages = list(range(8 * i, 8 * i + 8))
        engine.add(Dispatch(bytes([i]) * 16, ids_to_bytes(prompt), 0, b"", ids_to_bytes(pages), sampling))
    texts: dict[bytes, str] = {}
    finished: dict[bytes, Finished] = {}
    for _ in range(64):
        engine.step()
        torch.cuda.synchronize()
        for msg in engine.take_messages():
            if isinstance(msg, Commit):
                engine.on_commit_ack(CommitAck(msg.request_id, msg.page_ids))
            elif isinstance(msg, Generated):
                texts[msg.request_id] = texts.get(msg.request_id, "") + "".join(
                    VOCAB[t] for t in bytes_to_ids(msg.tokens).tolist()
                )
            elif isinstance(msg, Finished):
                finished[msg.request_id] = msg
        if len(finished) == 4:
            break
    assert len(finished) == 4 and runner.num_graph_steps > 0
    for rid, fin in finished.items():
        assert re.fullmatch(PATTERN, texts[rid]), texts[rid]
        assert fin.reason is FinishReason.STOP
