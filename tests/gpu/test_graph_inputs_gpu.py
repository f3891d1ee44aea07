"""GraphInputs on the GPU (computeworker.model.graph_inputs): a captured graph copies the staged host image in
as its first node, and steps staged back to back, with no wait between them, each reach their own replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.graph_inputs import GraphInputs

PAGE = 4
ROWS = 8


def capture(inputs: GraphInputs) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A graph that copies the inputs in and writes a function of the whole buffer (and spins a while, so
    the host runs ahead of the GPU when steps are issued back to back)."""
    stream = torch.cuda.Stream()
    inputs.stage(np.zeros(2, dtype=np.int64), np.zeros(0, dtype=np.int32))
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        inputs.copy_in()
        spin = torch.ones(1 << 20, device="cuda")
        for _ in range(20):
            spin = spin * 1.0001
        out = inputs.buffer * 2 + (spin.sum() * 0).long()
    torch.cuda.synchronize()
    return graph, out


def test_each_replay_reads_the_inputs_staged_for_it() -> None:
    inputs = GraphInputs(ROWS, 2, torch.device("cuda"), max_pages=6)
    graph, out = capture(inputs)
    expected, got = [], []
    for step in range(30):
        ids = [step * 10 + i for i in range(1 + step % ROWS)]
        batch = build_forward_batch([SeqChunk(ids, step, list(range(step + 3)))], PAGE, "cpu")
        host = batch.host_inputs
        pages = np.arange(step % 7, dtype=np.int32) + step
        inputs.load(host, PAGE, extra=host.qo_indptr, pages=pages[:6])
        graph.replay()
        got.append(out.clone())  # ordered after this replay on the stream; no host wait
        image = np.zeros(inputs.buffer.shape[0], dtype=np.int64)
        image[:] = inputs._image  # what this step staged (the replay reads it before the next load)
        expected.append(image * 2)
    torch.cuda.synchronize()
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert np.array_equal(g.cpu().numpy(), e), step
    assert int(got[-1][0]) == 2 * 290  # the last step's first token id, doubled


def test_misfits_raise_and_change_nothing() -> None:
    inputs = GraphInputs(ROWS, 2, torch.device("cuda"), max_pages=4)
    before = inputs._image.copy()
    with pytest.raises(ValueError, match="pages exceed"):
        inputs.stage(np.zeros(2, dtype=np.int64), np.zeros(5, dtype=np.int32))
    with pytest.raises(ValueError, match="extra values"):
        inputs.stage(np.zeros(3, dtype=np.int64))
    assert np.array_equal(inputs._image, before)
