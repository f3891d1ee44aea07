"""The Triton split-KV paged prefill against float64 attention: many batch layouts (long and short
prefixes, several sequences, partial pages and tiles, cold prompts), strided q, launch shapes, and one
CUDA graph replayed for other layouts after `plan`."""

from __future__ import annotations

import pytest
import torch

from computeworker.model.attention_triton import TritonPagedPrefill, TritonPrefillConfig
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from tests.gpu.test_attention_flashinfer import BF16_REL_TOL, DIM, HEADS, KV_HEADS, PAGE, reference, rel_err

NUM_PAGES = 1400
MAX_TOKENS = 256

# (cached prefix, new tokens) per sequence.
LAYOUTS = [
    [(10_000, 100)],
    [(0, 128)],
    [(16, 1)],
    [(5, 2)],
    [(2_500, 25)] * 4,
    [(37, 20), (10_000, 100), (0, 3)],
    [(1_000, 255)],
    [(3, 7), (9, 9)],
]


def _setup(gen: torch.Generator) -> tuple[torch.Tensor, list[list[int]]]:
    pool = torch.randn(
        (NUM_PAGES, 2, PAGE, KV_HEADS, DIM), dtype=torch.bfloat16, device="cuda", generator=gen
    )
    perm = torch.randperm(NUM_PAGES, generator=torch.Generator().manual_seed(1)).tolist()
    return pool, [perm[i * 700 : (i + 1) * 700] for i in range(2)] + [perm[:1]]


def _plan(impl: TritonPagedPrefill, layout, page_lists) -> object:
    chunks = [
        SeqChunk([0] * count, start, page_lists[i % len(page_lists)])
        for i, (start, count) in enumerate(layout)
    ]
    batch = build_forward_batch(chunks, PAGE, "cuda")
    host = [t.cpu().to(torch.int32) for t in (batch.qo_indptr, batch.kv_indptr, batch.kv_last_page_len)]
    impl.plan(host[0], host[1], batch.kv_page_ids, host[2], HEADS, KV_HEADS, DIM, PAGE, causal=True)
    return batch


@pytest.mark.parametrize(
    "config",
    [TritonPrefillConfig(), TritonPrefillConfig(32, 64, 4, 8, 2), TritonPrefillConfig(16, 128, 16, 4, 3)],
    ids=str,
)
def test_matches_float64_attention(config: TritonPrefillConfig) -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    pool, page_lists = _setup(gen)
    page_lists = page_lists[:2]
    impl = TritonPagedPrefill(
        num_qo_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM, page_size=PAGE, max_seqs=4,
        max_tokens=MAX_TOKENS, max_pages=4 * 700, device="cuda", config=config,
    )  # fmt: skip
    for layout in LAYOUTS:
        if any(start + count > 700 * PAGE for start, count in layout):
            continue
        # q as the model passes it: a strided slice of a fused [q | k | v] projection.
        qkv = torch.randn(
            (MAX_TOKENS, (HEADS + 2 * KV_HEADS) * DIM), dtype=torch.bfloat16, device="cuda", generator=gen
        )
        q = qkv[:, : HEADS * DIM].view(-1, HEADS, DIM)
        sentinel = torch.full((MAX_TOKENS, HEADS, DIM), 7.0, dtype=torch.bfloat16, device="cuda")
        batch = _plan(impl, layout, page_lists)
        out = impl.run(q, pool, out=sentinel)
        t = batch.num_tokens
        err = rel_err(out[:t], reference(batch, q[:t], pool))
        assert err < BF16_REL_TOL, (layout, err)
        assert bool((out[t:] == 7.0).all()), "rows past the batch must not be written"


def test_one_graph_replays_every_layout() -> None:
    gen = torch.Generator(device="cuda").manual_seed(4)
    pool, page_lists = _setup(gen)
    page_lists = page_lists[:2]
    impl = TritonPagedPrefill(
        num_qo_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM, page_size=PAGE, max_seqs=4,
        max_tokens=MAX_TOKENS, max_pages=4 * 700, device="cuda",
    )  # fmt: skip
    q = torch.zeros((MAX_TOKENS, HEADS, DIM), dtype=torch.bfloat16, device="cuda")
    out = torch.zeros_like(q)
    key = impl.launch_key
    _plan(impl, [(0, MAX_TOKENS)], page_lists)
    impl.run(q, pool, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl.run(q, pool, out=out)
    for layout in LAYOUTS:
        batch = _plan(impl, layout, page_lists)
        q.normal_(generator=gen)
        graph.replay()
        torch.cuda.synchronize()
        t = batch.num_tokens
        err = rel_err(out[:t], reference(batch, q[:t], pool))
        assert err < BF16_REL_TOL, (layout, err)
    assert impl.launch_key == key


def test_rejects_what_it_cannot_hold() -> None:
    impl = TritonPagedPrefill(
        num_qo_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM, page_size=PAGE, max_seqs=2,
        max_tokens=128, max_pages=16, device="cuda",
    )  # fmt: skip
    with pytest.raises(ValueError, match="pages exceed"):
        _plan(impl, [(1000, 10)], [list(range(100))])
    with pytest.raises(ValueError, match="new tokens exceed"):
        _plan(impl, [(0, 100), (0, 100)], [list(range(8)), list(range(8, 16))])
    with pytest.raises(ValueError, match="power-of-two"):
        TritonPagedPrefill(
            num_qo_heads=9, num_kv_heads=3, head_dim=64, page_size=16, max_seqs=1, max_tokens=16, max_pages=4,
            device="cuda",
        )  # fmt: skip
