"""FlashInferAttention against a float32 reference (and TorchAttention when present) on mixed batches:
prefill over a cached prefix, cold prefill, decode, partial last pages, scattered page ids."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from computeworker.model.batch import ForwardBatch

PAGE = 16
HEADS, KV_HEADS, DIM = 32, 8, 128  # head_dim 128 + bf16: the one FlashInfer compile set we warm
NUM_PAGES = 64
DEVICE = "cuda"
BF16_REL_TOL = 1e-2  # bf16 operands land between 1e-3 and 1e-2 against an fp32 reference


def make_batch(q_lens: list[int], kv_lens: list[int], gen: torch.Generator) -> ForwardBatch:
    """Sequences on a random permutation of pool pages; new tokens are the last q_len of kv_len."""
    perm = torch.randperm(NUM_PAGES, generator=gen).tolist()
    page_ids: list[int] = []
    indptr = [0]
    write_pages: list[int] = []
    write_slots: list[int] = []
    positions: list[int] = []
    for q_len, kv_len in zip(q_lens, kv_lens, strict=True):
        n = (kv_len + PAGE - 1) // PAGE
        pages = [perm.pop() for _ in range(n)]
        page_ids += pages
        indptr.append(indptr[-1] + n)
        for pos in range(kv_len - q_len, kv_len):
            positions.append(pos)
            write_pages.append(pages[pos // PAGE])
            write_slots.append(pos % PAGE)
    qo = [0]
    for q_len in q_lens:
        qo.append(qo[-1] + q_len)

    def dev(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=DEVICE)

    return ForwardBatch(
        input_ids=dev([0] * len(positions), torch.int64),
        positions=dev(positions, torch.int64),
        qo_indptr=dev(qo, torch.int32),
        kv_indptr=dev(indptr, torch.int32),
        kv_page_ids=dev(page_ids, torch.int32),
        kv_last_page_len=dev([kv - ((kv + PAGE - 1) // PAGE - 1) * PAGE for kv in kv_lens], torch.int32),
        write_page_ids=dev(write_pages, torch.int64),
        write_slots=dev(write_slots, torch.int64),
        q_lens=tuple(q_lens),
        kv_lens=tuple(kv_lens),
    )


def reference(batch: ForwardBatch, q: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
    """Causal attention in float64 over each sequence's pages (kv_layer already holds the new K/V)."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    group = HEADS // KV_HEADS
    for b, (q_len, kv_len) in enumerate(zip(batch.q_lens, batch.kv_lens, strict=True)):
        pages = batch.kv_page_ids[int(batch.kv_indptr[b]) : int(batch.kv_indptr[b + 1])].long()
        k = kv_layer[pages, 0].reshape(-1, KV_HEADS, DIM)[:kv_len].double()
        v = kv_layer[pages, 1].reshape(-1, KV_HEADS, DIM)[:kv_len].double()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        start = int(batch.qo_indptr[b])
        qb = q[start : start + q_len].double()
        scores = torch.einsum("qhd,khd->hqk", qb, k) / DIM**0.5
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
        k_pos = torch.arange(kv_len, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def backend():
    from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention

    attn = FlashInferAttention(AttentionShape(HEADS, KV_HEADS, DIM, PAGE), device=DEVICE)
    attn.warmup()
    return attn


CASES = {
    # q_lens, kv_lens
    "prefill_over_cached_prefix": ([20], [57]),
    "mixed_prefill_cold_cached_decode": ([33, 20, 1, 16], [33, 57, 80, 160]),
    "decode_partial_pages": ([1, 1, 1, 1, 1], [1, 16, 17, 130, 511]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_and_writes_only_new_slots(backend, case: str) -> None:
    q_lens, kv_lens = CASES[case]
    gen = torch.Generator().manual_seed(sum(kv_lens))
    batch = make_batch(q_lens, kv_lens, gen)
    kv_layer = torch.randn((NUM_PAGES, 2, PAGE, KV_HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    # Poison the slots the batch must write: any slot left unwritten shows up as NaN in the output.
    kv_layer[batch.write_page_ids, :, batch.write_slots] = float("nan")
    before = kv_layer.clone()
    t = batch.num_tokens
    q = torch.randn((t, HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    k = torch.randn((t, KV_HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    v = torch.randn((t, KV_HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)

    backend.begin(batch)
    out = backend.forward(0, q, k, v, kv_layer)

    assert out.shape == (t, HEADS, DIM)
    assert out.dtype == torch.bfloat16
    assert torch.equal(kv_layer[batch.write_page_ids, 0, batch.write_slots], k)
    assert torch.equal(kv_layer[batch.write_page_ids, 1, batch.write_slots], v)
    untouched = torch.ones(kv_layer.shape[:3], dtype=torch.bool, device=DEVICE)
    untouched[batch.write_page_ids, :, batch.write_slots] = False
    assert torch.equal(kv_layer[untouched], before[untouched])
    assert not out.isnan().any()
    assert rel_err(out, reference(batch, q, kv_layer)) < BF16_REL_TOL


@pytest.mark.skipif(
    importlib.util.find_spec("computeworker.model.attention_torch") is None, reason="TorchAttention absent"
)
def test_matches_torch_backend(backend) -> None:
    from computeworker.model.attention_torch import TorchAttention

    q_lens, kv_lens = CASES["mixed_prefill_cold_cached_decode"]
    batch = make_batch(q_lens, kv_lens, torch.Generator().manual_seed(7))
    kv_layer = torch.randn((NUM_PAGES, 2, PAGE, KV_HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    kv_torch = kv_layer.clone()
    t = batch.num_tokens
    q = torch.randn((t, HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    k = torch.randn((t, KV_HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    v = torch.randn((t, KV_HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    torch_attn = TorchAttention()
    torch_attn.begin(batch)
    expected = torch_attn.forward(0, q, k, v, kv_torch)
    backend.begin(batch)
    out = backend.forward(0, q, k, v, kv_layer)
    assert torch.equal(kv_layer, kv_torch)
    assert rel_err(out, expected.double()) < BF16_REL_TOL


def test_decode_after_prefill_continues_the_sequence(backend) -> None:
    """Prefill 40 tokens, then decode token 41 into the same pages: the decode sees all 41."""
    gen = torch.Generator().manual_seed(3)
    prefill = make_batch([40], [40], gen)
    kv_layer = torch.randn((NUM_PAGES, 2, PAGE, KV_HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    backend.begin(prefill)
    backend.forward(
        0,
        torch.randn((40, HEADS, DIM), dtype=torch.bfloat16, device=DEVICE),
        torch.randn((40, KV_HEADS, DIM), dtype=torch.bfloat16, device=DEVICE),
        torch.randn((40, KV_HEADS, DIM), dtype=torch.bfloat16, device=DEVICE),
        kv_layer,
    )
    pages = prefill.kv_page_ids.tolist()
    decode = ForwardBatch(
        input_ids=torch.zeros(1, dtype=torch.int64, device=DEVICE),
        positions=torch.tensor([40], device=DEVICE),
        qo_indptr=torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
        kv_indptr=torch.tensor([0, 3], dtype=torch.int32, device=DEVICE),
        kv_page_ids=torch.tensor(pages, dtype=torch.int32, device=DEVICE),
        kv_last_page_len=torch.tensor([9], dtype=torch.int32, device=DEVICE),
        write_page_ids=torch.tensor([pages[2]], device=DEVICE),
        write_slots=torch.tensor([8], device=DEVICE),
        q_lens=(1,),
        kv_lens=(41,),
    )
    q = torch.randn((1, HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    k = torch.randn((1, KV_HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    backend.begin(decode)
    out = backend.forward(0, q, k, k, kv_layer)
    assert torch.equal(kv_layer[pages[2], 0, 8], k[0])
    assert rel_err(out, reference(decode, q, kv_layer)) < BF16_REL_TOL


def test_misuse_raises_value_error() -> None:
    from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention, host_page_table

    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        AttentionShape(12, 8, DIM, PAGE)
    with pytest.raises(ValueError, match="kv_len >= 1"):
        host_page_table((3, 0), PAGE)
    attn = FlashInferAttention(
        AttentionShape(HEADS, KV_HEADS, DIM, PAGE), device=DEVICE, workspace_bytes=1 << 20
    )
    with pytest.raises(ValueError, match="before begin"):
        attn.forward(0, *(torch.empty(0),) * 4)
    batch = make_batch([4], [20], torch.Generator().manual_seed(1))
    bad = batch.replace(kv_lens=(40,))
    with pytest.raises(ValueError, match="kv_page_ids holds 2 pages, kv_lens need 3"):
        attn.begin(bad)


def test_host_page_table() -> None:
    from computeworker.model.attention_flashinfer import host_page_table

    indptr, last = host_page_table((1, 16, 17, 33), PAGE)
    assert indptr.tolist() == [0, 1, 2, 4, 7]
    assert last.tolist() == [1, 16, 1, 1]
