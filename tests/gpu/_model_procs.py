"""Process bodies for the model GPU tests (spawned children import them from here)."""

from __future__ import annotations

from multiprocessing.connection import Connection

import msgspec
import torch

from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.loader import load_model
from shared.pool import map_pool
from shared.protocol import PoolDescriptor


def prefill_into_pool(
    model_dir: str, desc_bytes: bytes, tokens: list[int], page_ids: list[int], conn: Connection
) -> None:
    """Worker A: map the shared pool, prefill `tokens` from position 0 into `page_ids`, wait for the
    kernels to finish (what a commit waits for), report, then unmap."""
    desc = msgspec.msgpack.decode(desc_bytes, type=PoolDescriptor)
    mapped = map_pool(desc)
    model, spec = load_model(model_dir, dtype=torch.bfloat16, device="cuda", progress=False)
    attn = FlashInferAttention(
        AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim, desc.page_size), device="cuda"
    )
    batch = build_forward_batch([SeqChunk(tokens, 0, page_ids)], desc.page_size, "cuda")
    model.forward(batch, mapped.tensor, attn)
    torch.cuda.synchronize()
    conn.send("written")
    conn.recv()  # the reader is done
    mapped.close()
