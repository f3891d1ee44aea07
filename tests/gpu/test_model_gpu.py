"""Our model on the GPU with FlashInfer attention: bf16 logits against transformers on random weights,
cold and cached outputs identical, and a second worker process reading prefix pages the first wrote."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import msgspec
import pytest
import torch

from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from shared.kv_layout import KVLayout
from shared.pool import map_pool
from shared.protocol import PoolDescriptor
from tests.gpu._model_procs import prefill_into_pool
from tests.gpu._pool_procs import TIMEOUT_S, own_pool

PAGE = 16
NUM_PAGES = 64
BF16_LOGITS_REL_TOL = 2e-2  # bf16 weights and activations through 2 layers, against fp32 transformers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama (GQA 8:2, head_dim 128) saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("random-llama")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=["model.forward", "fused"])
def ours(request: pytest.FixtureRequest, model_dir: Path):
    """(forward function, spec, attention): the model's own forward, and the fused CUDA forward."""
    from computeworker.model.llama_cuda import LlamaCudaForward
    from computeworker.model.loader import load_model

    model, spec = load_model(model_dir, dtype=torch.bfloat16, device="cuda", progress=False)
    attn = FlashInferAttention(
        AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim, PAGE), device="cuda"
    )
    attn.warmup()
    forward = model.forward if request.param == "model.forward" else LlamaCudaForward(model)
    return forward, spec, attn


def new_pool(spec) -> torch.Tensor:
    shape = (spec.num_layers, NUM_PAGES, 2, PAGE, spec.num_kv_heads, spec.head_dim)
    return torch.zeros(shape, dtype=torch.bfloat16, device="cuda")


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate(ours, pool: torch.Tensor, tokens: list[int], start_pos: int, pages: list[int], n: int):
    """Prefill tokens[start_pos:] over pages already holding tokens[:start_pos], then greedy-decode n
    tokens. Returns (prefill logits [vocab], generated ids)."""
    forward, _, attn = ours
    batch = build_forward_batch([SeqChunk(tokens[start_pos:], start_pos, pages)], PAGE, "cuda")
    first = forward(batch, pool, attn, False)[0]
    out = [int(first.argmax())]
    pos = len(tokens)
    for _ in range(n - 1):
        batch = build_forward_batch([SeqChunk([out[-1]], pos, pages)], PAGE, "cuda")
        out.append(int(forward(batch, pool, attn, False)[0].argmax()))
        pos += 1
    return first, out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def test_bf16_logits_match_transformers(model_dir: Path, ours) -> None:
    from transformers import LlamaForCausalLM

    forward, spec, attn = ours
    tokens = prompt(200, seed=1)
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cuda").eval()
    with torch.no_grad():
        expected = reference(torch.tensor([tokens], device="cuda")).logits[0]
    pool = new_pool(spec)
    batch = build_forward_batch([SeqChunk(tokens, 0, list(range(13)))], PAGE, "cuda")
    logits = forward(batch, pool, attn, True)
    assert logits.shape == (200, 1000)
    assert rel_err(logits, expected) < BF16_LOGITS_REL_TOL
    # Decode one token over the 200 cached positions: the same as transformers on 201 tokens.
    batch = build_forward_batch([SeqChunk([7], 200, list(range(13)))], PAGE, "cuda")
    step = forward(batch, pool, attn, False)
    with torch.no_grad():
        expected_step = reference(torch.tensor([[*tokens, 7]], device="cuda")).logits[0, -1]
    assert rel_err(step[0], expected_step) < BF16_LOGITS_REL_TOL


def test_cold_and_cached_outputs_identical(ours) -> None:
    _, spec, _ = ours
    tokens = prompt(150, seed=2)
    pool = new_pool(spec)
    cold_pages = list(range(0, 12))
    cold_logits, cold_out = generate(ours, pool, tokens, 0, cold_pages, n=24)
    # A second request with the same prompt: its first 128 tokens (8 full pages) are a cache hit on the
    # first request's pages; the rest goes to fresh pages.
    cached_pages = cold_pages[:8] + list(range(20, 24))
    cached_logits, cached_out = generate(ours, pool, tokens, 128, cached_pages, n=24)
    assert cached_out == cold_out
    assert rel_err(cached_logits, cold_logits) < 1e-2


def test_second_worker_reads_pages_the_first_wrote(model_dir: Path, ours) -> None:
    spec = ours[1]
    tokens = prompt(150, seed=3)
    ctx = mp.get_context("spawn")
    layout = KVLayout(spec.num_layers, NUM_PAGES, PAGE, spec.num_kv_heads, spec.head_dim, "bfloat16")
    owner_end, owner_conn = ctx.Pipe()
    owner_done = ctx.Barrier(2)
    owner = ctx.Process(target=own_pool, args=(layout, owner_conn, owner_done))
    owner.start()
    assert owner_end.poll(TIMEOUT_S)
    desc_bytes = owner_end.recv_bytes()
    writer_end, writer_conn = ctx.Pipe()
    prefix_pages = [5, 9, 2, 30, 17, 11, 40, 3]  # 128 tokens, scattered like a radix cache leaves them
    writer = ctx.Process(
        target=prefill_into_pool, args=(str(model_dir), desc_bytes, tokens[:128], prefix_pages, writer_conn)
    )
    writer.start()
    assert writer_end.poll(TIMEOUT_S)
    assert writer_end.recv() == "written"

    mapped = map_pool(msgspec.msgpack.decode(desc_bytes, type=PoolDescriptor))
    shared_logits, shared_out = generate(ours, mapped.tensor, tokens, 128, [*prefix_pages, 50, 51], n=8)
    cold_logits, cold_out = generate(ours, new_pool(spec), tokens, 0, list(range(10)), n=8)
    mapped.close()
    writer_end.send("done")
    writer.join(TIMEOUT_S)
    owner_done.wait(TIMEOUT_S)
    assert owner_end.poll(TIMEOUT_S)
    owner_end.recv()
    owner.join(TIMEOUT_S)
    assert writer.exitcode == 0
    assert owner.exitcode == 0
    assert shared_out == cold_out
    assert rel_err(shared_logits, cold_logits) < 1e-2
