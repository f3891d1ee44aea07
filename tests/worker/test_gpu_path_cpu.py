"""The GPU path's CPU-testable parts: commit fences hold Commit/Finished back, step stats, random-weight
models (seeded, identical across loads), decode graph batch sizes, and the new worker flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.random_model import LlamaShape, write_model_dir
from computeworker.cli import build_parser, config_from_args
from computeworker.engine.engine import Engine, EngineConfig
from computeworker.engine.fences import StepStats
from computeworker.model.cuda_graphs import graph_batch_sizes
from computeworker.model.random_weights import random_model
from shared.ids import ids_to_bytes
from shared.pool import MappedPool
from shared.protocol import Commit, Dispatch, Finished, Generated, PageRequest, SamplingParams

from .conftest import CountingModel, LetterTokenizer

RID = b"f" * 16


class ManualFence:
    """A fence the test completes by hand."""

    def __init__(self) -> None:
        self.done = False
        self.waited = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited += 1
        self.done = True


def _engine(pool: MappedPool, fences: list[ManualFence], stats: list[StepStats]) -> Engine:
    def make() -> ManualFence:
        fences.append(ManualFence())
        return fences[-1]

    config = EngineConfig(
        page_size=4, context_len=64, prefill_chunk=16, stream_max_tokens=1, stream_interval_s=0
    )
    return Engine(
        CountingModel(),
        object(),
        pool.tensor,
        LetterTokenizer(),
        config,
        make_fence=make,
        on_step=stats.append,
    )  # type: ignore[arg-type]


def test_commit_and_finished_wait_for_their_fence(shm_pool: MappedPool) -> None:
    fences: list[ManualFence] = []
    stats: list[StepStats] = []
    eng = _engine(shm_pool, fences, stats)
    prompt = list(range(1, 10))  # 9 tokens: pages 3, 4 full, page 5 holds 1
    eng.add(
        Dispatch(RID, ids_to_bytes(prompt), 0, b"", ids_to_bytes([3, 4, 5]), SamplingParams(max_tokens=1))
    )
    assert [type(m) for m in eng.take_messages()] == []
    assert eng.step() == 9
    assert len(fences) == 1 and stats == [StepStats(1, 9, 9, 0, stats[0].seconds)]
    # The first token may go; Commit (and Finished after it) wait for the fence of the step that wrote.
    assert [type(m) for m in eng.take_messages()] == [Generated]
    assert eng.pending_fence() is fences[0]
    assert eng.take_messages() == []
    fences[0].synchronize()
    assert eng.pending_fence() is None
    msgs = eng.take_messages()
    assert [type(m) for m in msgs] == [Commit]
    assert isinstance(msgs[0], Commit) and msgs[0].page_ids == ids_to_bytes([3, 4])


def test_messages_without_pages_never_wait(shm_pool: MappedPool) -> None:
    fences: list[ManualFence] = []
    eng = _engine(shm_pool, fences, [])
    eng.add(Dispatch(RID, ids_to_bytes([1, 2, 3]), 0, b"", ids_to_bytes([7]), SamplingParams(max_tokens=5)))
    assert [type(m) for m in eng.take_messages()] == [PageRequest]
    eng.step()  # 3 prompt tokens, no full page: no Commit
    assert not fences[0].done
    assert [type(m) for m in eng.take_messages()] == [Generated]
    assert eng.pending_fence() is None


def test_finished_with_pages_waits_for_the_latest_fence(shm_pool: MappedPool) -> None:
    fences: list[ManualFence] = []
    eng = _engine(shm_pool, fences, [])
    eng.add(
        Dispatch(RID, ids_to_bytes([1, 2, 3]), 0, b"", ids_to_bytes([7, 8]), SamplingParams(max_tokens=3))
    )
    eng.step()
    eng.step()
    eng.step()  # positions 0..4 written: page 7 full; the third token finishes the request
    assert [type(m) for m in eng.take_messages()] == [Generated, Generated, Generated]
    fences[0].synchronize()
    assert eng.take_messages() == []  # Finished follows the last step's fence, not the first
    fences[-1].synchronize()
    finished = eng.take_messages()
    assert [type(m) for m in finished] == [Finished]
    assert isinstance(finished[0], Finished) and finished[0].page_ids == ids_to_bytes([7])


def test_random_model_is_seeded(tmp_path: Path) -> None:
    path = write_model_dir(tmp_path, LlamaShape(50, 32, 64, 2, 4, 2, 8, 128, 10000.0, 1e-5))
    a, spec = random_model(path, torch.float32, "cpu", seed=4)
    b, _ = random_model(path, torch.float32, "cpu", seed=4)
    c, _ = random_model(path, torch.float32, "cpu", seed=5)
    assert spec.vocab_size == 50 and spec.num_layers == 2
    for (name, x), (_, y), (_, z) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True
    ):
        assert torch.equal(x, y), name
        if "norm" in name:
            assert torch.equal(x, torch.ones_like(x))
        else:
            assert not torch.equal(x, z), name
            assert 0.015 < float(x.std()) < 0.025, name
    with pytest.raises(ValueError, match="std"):
        random_model(path, torch.float32, "cpu", std=0.0)


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(16) == (1, 2, 4, 8, 16)
    assert graph_batch_sizes(50) == (1, 2, 4, 8, 16, 24, 32, 48, 50)
    assert graph_batch_sizes(200)[-4:] == (128, 160, 192, 200)
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def test_gpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["--model", "/m", "--random-weights", "--seed", "3", "--no-cuda-graphs"])
    config = config_from_args(args)
    assert (config.random_weights, config.seed, config.cuda_graphs, config.max_graph_batch) == (
        True,
        3,
        False,
        0,
    )
    monkeypatch.setenv("RADIXKV_CUDA_GRAPHS", "0")
    monkeypatch.setenv("RADIXKV_LOG_STEPS", "1")
    config = config_from_args(build_parser().parse_args([]))
    assert (config.cuda_graphs, config.log_steps, config.random_weights) == (False, True, False)
    with pytest.raises(ValueError, match="random-weights needs --model"):
        config_from_args(build_parser().parse_args(["--random-weights"]))


def test_mixed_steps_default_by_device_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    def resolved(argv: list[str]) -> bool:
        return config_from_args(
            build_parser().parse_args(["--daemon", "ipc:///tmp/x", *argv])
        ).resolved_mixed_steps

    assert resolved([]) is True  # CPU
    assert resolved(["--device", "cuda:0"]) is False
    assert resolved(["--device", "cuda:0", "--mixed-steps"]) is True
    assert resolved(["--no-mixed-steps"]) is False
    monkeypatch.setenv("RADIXKV_MIXED_STEPS", "1")
    assert resolved(["--device", "cuda:0"]) is True
