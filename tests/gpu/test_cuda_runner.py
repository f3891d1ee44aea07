"""The CUDA worker pieces: decode and extend (prefill over a cached prefix) through CUDA graphs against the
eager fused forward (logits and every pool byte), and the whole stack with two GPU workers racing to
compute one prefix."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import pytest
import torch

from bench.random_model import LlamaShape, write_model_dir
from bench.serve_client import complete, random_tokens
from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.cuda_runner import CudaModelRunner
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.random_weights import random_model

PAGE = 16
SHAPE = LlamaShape(1000, 1024, 2048, 2, 8, 2, 128, 4096, 10000.0, 1e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("tiny-random"), SHAPE)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def assert_same_argmax(got: torch.Tensor, want: torch.Tensor) -> None:
    """Each row's argmax agrees, or the two picks tie in `want` at bf16 resolution: the logits are bf16
    before their float cast (one step is 2**-7 of the value's power of two), so two attention kernels
    whose rounding differs can swap the order of two logits that sit within a step or two."""
    for g, w in zip(got, want, strict=True):
        i, j = int(g.argmax()), int(w.argmax())
        if i != j:
            step = 2.0 ** (torch.frexp(w[j].abs().float()).exponent.item() - 8)
            assert float(w[j] - w[i]) <= 2 * step, (i, j, float(w[i]), float(w[j]))


def test_graph_decode_matches_eager(model_dir: Path) -> None:
    model, spec = random_model(model_dir, torch.bfloat16, "cuda", seed=3)
    attn = FlashInferAttention(
        AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim, PAGE), device="cuda"
    )
    pool = torch.zeros((2, 64, 2, PAGE, 2, 128), dtype=torch.bfloat16, device="cuda")
    graphs = CudaModelRunner(model, cuda_graphs=True, max_graph_batch=8)
    eager = CudaModelRunner(model, cuda_graphs=False)
    graphs.bind(pool, attn)
    # Three sequences (one sharing the first's two prefix pages), prefilled eagerly.
    pages = [[0, 1, 2, 3, 4], [0, 1, 10, 11, 12], [20, 21, 22, 23]]
    lens = [50, 40, 33]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in lens]
    prompts[1][:32] = prompts[0][:32]
    chunks = [
        SeqChunk(prompts[0], 0, pages[0]),
        SeqChunk(prompts[1][32:], 32, pages[1]),
        SeqChunk(prompts[2], 0, pages[2]),
    ]
    eager.forward(build_forward_batch(chunks, PAGE, "cuda"), pool, attn)
    eager_pool = pool.clone()
    tokens = [7, 8, 9]
    for step in range(20):  # crosses page boundaries (positions 48, 64)
        batch = build_forward_batch(
            [SeqChunk([tokens[i]], lens[i] + step, pages[i]) for i in range(3)], PAGE, "cuda"
        )
        before = pool.clone()
        got = graphs.forward(batch, pool, attn).clone()
        want = eager.forward(batch, eager_pool, attn)
        assert got.shape == (3, 1000)
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
        assert rel_err(got, want) < 1e-2
        # Only the three write slots changed, and they hold what the eager step wrote (to bf16 noise).
        changed = (pool != before).permute(1, 3, 0, 2, 4, 5).flatten(2).any(-1)  # [pages, page slots]
        slots = {(pages[i][(lens[i] + step) // PAGE], (lens[i] + step) % PAGE) for i in range(3)}
        assert {(p, s) for p, s in changed.nonzero().tolist()} == slots
        for p, s in slots:
            assert rel_err(pool[:, p, :, s], eager_pool[:, p, :, s]) < 1e-2
        tokens = got.argmax(-1).tolist()
    assert graphs.num_graph_steps == 20
    assert eager.num_graph_steps == 0


def test_graph_extend_matches_eager(model_dir: Path) -> None:
    """Padded extend graphs ("auto", buckets 32 / 64: fa3 over prefix chunks for one sequence, fa2 for
    two) against the eager fused forward with fa2 attention: same argmax (up to bf16 ties), logits within bf16 noise, and exactly the batch's
    write slots changed in the pool (the padding tokens' writes never land outside them)."""
    model, spec = random_model(model_dir, torch.bfloat16, "cuda", seed=4)
    shape = AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim, PAGE)
    attn = FlashInferAttention(shape, device="cuda")
    eager_attn = FlashInferAttention(shape, device="cuda", prefill_backend="fa2")
    pool = torch.zeros((2, 64, 2, PAGE, 2, 128), dtype=torch.bfloat16, device="cuda")
    graphs = CudaModelRunner(
        model, cuda_graphs=True, max_graph_batch=4, extend_batch_sizes=(1, 2), extend_token_buckets=(32, 64)
    )
    eager = CudaModelRunner(model, cuda_graphs=False)
    graphs.bind(pool, attn)
    assert graphs.extend_backend == "auto"
    gen = torch.Generator().manual_seed(6)
    pages = [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 10, 11, 12, 13, 14, 15]]
    prefix = torch.randint(3, 1000, (40,), generator=gen).tolist()
    # Cached prefixes: 40 tokens in pages 0..2 (shared 2 pages), the second sequence 40 of its own after.
    eager.forward(build_forward_batch([SeqChunk(prefix, 0, pages[0])], PAGE, "cuda"), pool, attn)
    eager.forward(build_forward_batch([SeqChunk(prefix[32:], 32, pages[1])], PAGE, "cuda"), pool, attn)
    eager_pool = pool.clone()

    def new_tokens(n: int) -> list[int]:
        return torch.randint(3, 1000, (n,), generator=gen).tolist()

    # (start positions, new token counts): pad 12, pad 24 over two sequences, no pad, two full pages.
    steps = [((40,), (20,)), ((60, 40), (10, 30)), ((70,), (32,)), ((102, 70), (3, 1))]
    for starts, counts in steps:
        chunks = [
            SeqChunk(new_tokens(c), p, pages[i]) for i, (p, c) in enumerate(zip(starts, counts, strict=True))
        ]
        batch = build_forward_batch(chunks, PAGE, "cuda")
        before = pool.clone()
        got = graphs.forward(batch, pool, attn).clone()
        want = eager.forward(batch, eager_pool, eager_attn)
        assert got.shape == (len(chunks), 1000)
        assert_same_argmax(got, want)
        assert rel_err(got, want) < 1e-2
        changed = (pool != before).permute(1, 3, 0, 2, 4, 5).flatten(2).any(-1)  # [pages, page slots]
        slots = {
            (pages[i][pos // PAGE], pos % PAGE)
            for i, (p, c) in enumerate(zip(starts, counts, strict=True))
            for pos in range(p, p + c)
        }
        assert {(p, s) for p, s in changed.nonzero().tolist()} == slots
        for p, s in slots:
            assert rel_err(pool[:, p, :, s], eager_pool[:, p, :, s]) < 1e-2
    assert graphs.num_extend_graph_steps == 4
    # Three sequences or more than 64 new tokens: no graph fits, the step runs eagerly.
    batch = build_forward_batch([SeqChunk(new_tokens(65), 0, [30, 31, 32, 33, 34])], PAGE, "cuda")
    got = graphs.forward(batch, pool, attn)
    assert (graphs.num_extend_graph_steps, graphs.num_eager_steps) == (4, 1)


def test_two_gpu_workers_race_on_one_prefix(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both workers compute the same prefix at once; whichever commits second has its duplicate pages
    freed. Pages only enter the tree after the kernels that wrote them completed, so a third request that
    hits them gets exactly the cold output."""
    from cachemgr.launcher import StackConfig, Supervisor, free_port

    # The hit's 9-token suffix runs in the 128-row extend graph, whose MLP is fused (fp32 SiLU input,
    # split-K down projection) where the cold racer's 512- and 256-row chunks run cuBLAS: another rounding,
    # which can flip a near-tied greedy token of a random-weight model. The workers inherit this.
    monkeypatch.setenv("RADIXKV_FUSED_MLP", "0")

    config = StackConfig(
        num_workers=2,
        model=str(model_dir),
        http_port=free_port(),
        run_dir=tmp_path / "run",
        device="cuda:0",
        log_dir=tmp_path / "logs",
        ready_timeout_s=300.0,
        # spread: the two racers must land on different workers (pack, the GPU default, would put both on
        # the first worker, and batch them together: another batch shape, other bf16 rounding)
        daemon_args=(
            "--device",
            "cuda:0",
            "--kv-dtype",
            "bfloat16",
            "--num-pages",
            "4096",
            "--dispatch",
            "spread",
        ),
        # fa2 in every extend graph, 512-token chunks: the cold racer's 512- and 137-token chunks and the
        # hit's 9-token suffix then all run fa2 extend graphs ("auto" puts chunks over 128 tokens on fa3,
        # and an unchunked 649-token prompt, CUDA's default 8192-token chunk, runs eagerly on fa3, whose
        # bf16 rounding differs: a random-weight model's near-tied logits can flip a greedy token).
        worker_args=(
            "--random-weights",
            "--max-running",
            "4",
            "--prefill-chunk",
            "512",
            "--extend-attention",
            "fa2",
        ),
    )

    async def race() -> list[tuple[list, list, int]]:
        rng = random.Random(11)
        out = []
        async with aiohttp.ClientSession() as s:
            for k in range(6):
                prompt = random_tokens(rng, 40 * PAGE + 9, SHAPE.vocab_size)
                both = await asyncio.gather(
                    *(complete(s, config.url, "random-llama", prompt, 8, f"race{k}") for _ in range(2))
                )
                third = await complete(s, config.url, "random-llama", prompt, 8, f"race{k}")
                out.append(([r.text for r in both], [r.cached_tokens for r in both], third))
        return out

    with Supervisor(config) as stack:
        stack.wait_ready(min_workers=2)
        results = asyncio.run(race())
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("worker-*.log")))
    assert logs.count("kernels warmed in") == 2
    for texts, cached, third in results:
        assert texts[0] == texts[1], cached
        assert third.cached_tokens == 40 * PAGE
        assert third.text == texts[0]
