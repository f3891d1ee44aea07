"""Extend graphs: captured graphs (buckets 128 and 256) replayed for short prefixes and a 10,000-token
prefix (on fa2: KV split across CTAs, partial results merged), each against float64 attention over the
pool, on fa2, fa3, fa3-split (fa3 over prefix chunks merged by log-sum-exp: 4 chunks for one sequence
in bucket 128, 2 for two sequences or bucket 256) and "auto" (fa3-split for one sequence, fa2 for two in
bucket 128, fa3 for two in 256). Attention only (no model around it), so the comparison is exact
up to bf16 operands, with no argmax ties to blur it."""

from __future__ import annotations

import pytest
import torch

from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.batch import ForwardBatch
from computeworker.model.extend_graphs import ExtendGraphs
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from tests.gpu.test_attention_flashinfer import BF16_REL_TOL, DIM, HEADS, KV_HEADS, PAGE, reference, rel_err

BUCKET = 128
NUM_PAGES = 1300  # 10,190 tokens need 637 pages: the first sequence owns pages 0..639, the second 640..
LONG = 10_000


class AttentionOnly:
    """A one-layer stand-in for the model: attention of static q/k/v buffers ([2 * BUCKET] rows, the graph
    reads whatever the test wrote into them before a replay). Returns the attention output."""

    def __init__(self) -> None:
        rows = 2 * BUCKET
        self.q = torch.zeros((rows, HEADS, DIM), dtype=torch.bfloat16, device="cuda")
        self.k = torch.zeros((rows, KV_HEADS, DIM), dtype=torch.bfloat16, device="cuda")
        self.v = torch.zeros((rows, KV_HEADS, DIM), dtype=torch.bfloat16, device="cuda")

    def __call__(
        self, batch: ForwardBatch, kv_pool: torch.Tensor, attention: object, all_logits: bool
    ) -> torch.Tensor:
        attention.begin(batch)  # type: ignore[attr-defined]
        n = batch.num_tokens
        return attention.forward(0, self.q[:n], self.k[:n], self.v[:n], kv_pool[0])  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", ["fa2", "fa3", "auto", "fa3-split"])
def test_one_graph_serves_short_and_long_prefixes(backend: str) -> None:
    if backend != "fa2" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("fa3 needs sm90")
    gen = torch.Generator(device="cuda").manual_seed(8)
    attn = FlashInferAttention(AttentionShape(HEADS, KV_HEADS, DIM, PAGE), device="cuda")
    layout = (1, NUM_PAGES, 2, PAGE, KV_HEADS, DIM)
    pool = torch.randn(layout, dtype=torch.bfloat16, device="cuda", generator=gen)
    scratch = torch.zeros((1, 8, *layout[2:]), dtype=torch.bfloat16, device="cuda")
    model = AttentionOnly()
    graphs = ExtendGraphs(
        model,
        attn,
        pool,
        max_pages_per_seq=NUM_PAGES,
        batch_sizes=(1, 2),
        token_buckets=(BUCKET, 2 * BUCKET),  # "auto": fa2 for the first, fa3 for the second
        backend=backend,
    )
    graphs.capture(scratch)
    pages_a = list(range(640))
    pages_b = list(range(640, 1280))
    # (start position, new tokens) per sequence: short prefixes, the long one, a cold full bucket, both.
    steps = [
        [(16, 100)],
        [(LONG, 100)],
        [(5, 2)],
        [(0, BUCKET)],
        [(LONG, 100), (37, 20)],
        [(3, 7), (LONG + 100, 90)],
        [(LONG, 2 * BUCKET - 20)],
        [(100, 150), (LONG - 300, 60)],
    ]
    for step in steps:
        chunks = [
            SeqChunk([0] * count, start, pages_a if i == 0 else pages_b)
            for i, (start, count) in enumerate(step)
        ]
        batch = build_forward_batch(chunks, PAGE, "cuda")
        t = batch.num_tokens
        for buf in (model.q, model.k, model.v):
            buf.normal_(generator=gen)
        q = model.q[:t].clone()
        out = graphs.run(batch)
        assert out is not None, f"{backend}: the plan for {step} differs from the capture's"
        torch.cuda.synchronize()
        # The graph wrote the new K/V into the pool; the reference reads the pool as it is now.
        written = pool[0].view(-1, KV_HEADS, DIM)
        rows = batch.write_page_ids * 2 * PAGE + batch.write_slots
        assert torch.equal(written[rows], model.k[:t])
        assert torch.equal(written[rows + PAGE], model.v[:t])
        err = rel_err(out[:t], reference(batch, q, pool[0]))
        assert err < BF16_REL_TOL, (backend, step, err)
    assert graphs.num_plan_mismatches == 0
