"""The host staging of a CUDA graph's inputs (computeworker.model.graph_inputs), on the CPU: the layout the
graph reads, padding rows, and the host arrays build_forward_batch keeps beside its tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from computeworker.model.batch import ForwardBatch, HostInputs
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.graph_inputs import fill_inputs

PAGE = 4


def test_fill_inputs_layout_and_padding() -> None:
    # Two sequences: 3 new tokens at positions 6..8 (pages 7, 9), 1 new token at position 0 (page 2).
    batch = build_forward_batch([SeqChunk([11, 12, 13], 6, [5, 7, 9]), SeqChunk([14], 0, [2])], PAGE, "cpu")
    rows = 6
    out = np.full(4 * rows + 3, -1, dtype=np.int64)
    fill_inputs(out, batch.host_inputs, rows, PAGE, extra=np.array([0, 3, 4]))
    assert out[:rows].tolist() == [11, 12, 13, 14, 0, 0]
    assert out[rows : 2 * rows].tolist() == [6, 7, 8, 0, 0, 0]
    kv = out[2 * rows : 4 * rows].reshape(rows, 2)
    # K row = page * 2 * PAGE + slot, V row = K row + PAGE; padding rows aim at row 0's slots.
    k = [7 * 8 + 2, 7 * 8 + 3, 9 * 8 + 0, 2 * 8 + 0]
    assert kv[:, 0].tolist() == k + [k[0]] * 2
    assert kv[:, 1].tolist() == [r + PAGE for r in k + [k[0]] * 2]
    assert out[4 * rows :].tolist() == [0, 3, 4]


def test_fill_inputs_matches_the_device_fields() -> None:
    """The staged values are the ForwardBatch's own, whether the host arrays were kept or read back."""
    batch = build_forward_batch([SeqChunk(list(range(100, 121)), 16, list(range(10, 20)))], PAGE, "cpu")
    bare = HostInputs.of(batch)
    kept = batch.host_inputs
    for name in ("input_ids", "positions", "write_page_ids", "write_slots", "qo_indptr", "kv_page_ids"):
        assert np.array_equal(getattr(bare, name), getattr(kept, name)), name
        assert getattr(batch, name).tolist() == getattr(kept, name).tolist(), name
    out = np.empty(4 * 32, dtype=np.int64)
    fill_inputs(out, kept, 32, PAGE)
    k_rows = batch.write_slots + batch.write_page_ids * 2 * PAGE
    assert out[64:128].reshape(32, 2)[:21, 0].tolist() == k_rows.tolist()


def test_fill_inputs_rejects_what_does_not_fit() -> None:
    batch = build_forward_batch([SeqChunk([1, 2, 3], 0, [0])], PAGE, "cpu")
    with pytest.raises(ValueError, match="do not fit"):
        fill_inputs(np.empty(8, dtype=np.int64), batch.host_inputs, 2, PAGE)  # 3 tokens in 2 rows
    with pytest.raises(ValueError, match="do not fit"):
        fill_inputs(np.empty(4 * 4 + 1, dtype=np.int64), batch.host_inputs, 4, PAGE)  # extra missing


def test_host_inputs_of_a_hand_built_batch() -> None:
    batch = build_forward_batch([SeqChunk([5, 6], 3, [1, 2])], PAGE, "cpu")
    bare = batch.replace(host=None)
    assert bare.host is None
    assert bare.host_inputs.positions.tolist() == [3, 4]
    assert bare.host_inputs.input_ids.dtype == np.int64
    assert torch.equal(bare.input_ids, batch.input_ids)


def test_device_fields_are_made_once_and_only_when_read() -> None:
    """A built batch copies nothing until a device field is read (a graphed step reads none), then once."""
    built = build_forward_batch([SeqChunk([5, 6, 7], 2, [1, 2])], PAGE, "cpu")
    calls = []

    def make_device():
        calls.append(1)
        return built.device_fields

    batch = ForwardBatch.deferred(make_device, built.q_lens, built.kv_lens, built.host_inputs)
    assert (batch.num_seqs, batch.num_tokens, batch.is_decode) == (1, 3, False)
    assert batch.host_inputs.positions.tolist() == [2, 3, 4]
    assert calls == []
    assert batch.positions.tolist() == [2, 3, 4]
    assert batch.kv_page_ids.tolist() == [1, 2] and batch.write_slots.tolist() == [2, 3, 0]
    assert calls == [1]
    assert batch.replace(kv_lens=(9,)).kv_lens == (9,) and calls == [1]
