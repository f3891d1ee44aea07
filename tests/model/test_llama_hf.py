"""Our decoder against transformers on tiny random Llama (GQA, llama3 rope scaling) and Qwen2 (q/k/v
bias, tied embeddings) checkpoints written by save_pretrained. fp32, CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from computeworker.model.forward_batch import SeqChunk
from computeworker.model.loader import load_model
from tests.model.harness import REL_TOL, check_against_reference, forward, hf_logits, new_pool, rel_err


def _models(path: Path) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours, _ = load_model(path, torch.float32, "cpu", progress=False)
    return hf, ours


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_prefill_decode_and_cache_hit_match_transformers(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    hf, ours = _models(request.getfixturevalue(fixture))
    # 90 positions: past the llama3 scaling's original context (64), so the scaled frequencies matter
    tokens = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(0)).tolist()
    check_against_reference(ours, hf_logits(hf, tokens), tokens, prefill_len=85, split=32)


def test_batched_forward_equals_each_sequence_alone(tiny_qwen2_dir: Path) -> None:
    _, model = _models(tiny_qwen2_dir)
    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(0, 256, (n,), generator=gen).tolist() for n in (37, 5, 20))
    pool = new_pool(model, 24)
    # c's first 16 tokens are cached in page 20 already; b decodes its 5th token
    forward(model, pool, [SeqChunk(c[:16], 0, [20])])
    forward(model, pool, [SeqChunk(b[:4], 0, [10])])
    chunks = [SeqChunk(a, 0, [1, 2, 3]), SeqChunk(b[4:], 4, [10]), SeqChunk(c[16:], 16, [20, 21])]
    batched = forward(model, pool, chunks, all_logits=True)
    assert batched.shape == (37 + 1 + 4, 256)
    last = forward(model, pool, chunks)
    assert last.shape == (3, 256)

    alone_pool = new_pool(model, 24)
    forward(model, alone_pool, [SeqChunk(c[:16], 0, [20])])
    forward(model, alone_pool, [SeqChunk(b[:4], 0, [10])])
    alone = [forward(model, alone_pool, [ch], all_logits=True) for ch in chunks]
    assert rel_err(batched, torch.cat(alone)) < REL_TOL / 10
    assert rel_err(last, torch.stack([x[-1] for x in alone])) < REL_TOL / 10
    # The pool holds the same K/V either way (same slots written in pages 1-3, 10, 20-21; others untouched)
    used = [1, 2, 3, 10, 20, 21]
    torch.testing.assert_close(pool[:, used], alone_pool[:, used], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(pool[:, [0, 4, 11, 22]]).all()


def test_load_rejects_missing_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    for f in tiny_llama_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 weights missing, e.g. \['model.layers.1.mlp.up_proj.weight'\]"):
        load_model(tmp_path, progress=False)
