"""Prompt logprobs on CUDA: the engine scores a 900-token prompt in chunks of at most 512 tokens through the
fused forward with every token's logits, and the values match one cold pass over the whole prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.random_model import write_model_dir
from computeworker.engine.engine import Engine, EngineConfig
from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.cuda_runner import CudaModelRunner
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.random_weights import random_model
from shared.ids import ids_to_bytes
from shared.protocol import Dispatch, PromptLogprobs, SamplingParams
from tests.gpu.test_cuda_runner import PAGE, SHAPE

pytestmark = pytest.mark.gpu


class _NoStops:
    def detokenizer(self, prompt: list[int]) -> object:
        raise AssertionError("no stop strings here")


def test_prompt_logprobs_on_cuda_match_one_cold_pass(tmp_path: Path) -> None:
    model, spec = random_model(write_model_dir(tmp_path, SHAPE), torch.bfloat16, "cuda", seed=4)
    attn = FlashInferAttention(
        AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim, PAGE), device="cuda"
    )
    pool = torch.zeros((2, 80, 2, PAGE, 2, 128), dtype=torch.bfloat16, device="cuda")
    runner = CudaModelRunner(model, max_graph_batch=8)
    runner.bind(pool, attn)
    prompt = torch.randint(3, 1000, (900,), generator=torch.Generator().manual_seed(2)).tolist()
    pages = list(range(60))
    config = EngineConfig(
        PAGE, spec.max_position_embeddings, (), max_running=4, prefill_chunk=8192, mixed_steps=False
    )
    engine = Engine(runner, attn, pool, _NoStops(), config)  # type: ignore[arg-type]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=3)
    engine.add(Dispatch(b"s" * 16, ids_to_bytes(prompt), 0, b"", ids_to_bytes(pages), params))
    frames: list[PromptLogprobs] = []
    for _ in range(4):
        engine.step()
        frames += [m for m in engine.take_messages() if isinstance(m, PromptLogprobs)]
    (frame,) = frames
    got = np.frombuffer(frame.logprobs, "<f4")
    top = np.frombuffer(frame.top_ids, "<i4").reshape(-1, 3)

    scratch = torch.zeros_like(pool)
    cold = CudaModelRunner(model, cuda_graphs=False)
    batch = build_forward_batch([SeqChunk(prompt, 0, pages)], PAGE, "cuda")
    reference = torch.log_softmax(cold.forward(batch, scratch, attn, True).float(), dim=-1)
    want = reference[torch.arange(899), torch.tensor(prompt[1:])].cpu().numpy()
    assert len(got) == 899
    assert np.abs(got - want).max() < 0.1  # bf16: chunked (512 + 388) against one pass
    agree = (top[:, 0] == reference[:899].topk(1, dim=-1).indices[:, 0].cpu().numpy()).mean()
    assert agree > 0.95, agree  # the top choice, up to near-ties at bf16 resolution
