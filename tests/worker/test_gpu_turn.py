"""GPU turns: one step at a time across processes, held exactly around a step's device work, never kept
by a dead process, and configurable from the worker's flags."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from computeworker.cli import build_parser, config_from_args
from computeworker.engine.engine import Engine, EngineConfig
from computeworker.engine.fences import StepStats
from computeworker.engine.gpu_turn import GpuTurn, turn_path
from shared.ids import ids_to_bytes
from shared.pool import MappedPool
from shared.protocol import Dispatch, SamplingParams

from .conftest import CountingModel, LetterTokenizer

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from computeworker.engine.gpu_turn import GpuTurn
    turn = GpuTurn(Path(sys.argv[1]))
    log = open(sys.argv[2], "a", buffering=1)
    for _ in range(int(sys.argv[3])):
        turn.take()
        log.write(f"take {time.monotonic_ns()}\\n")
        time.sleep(0.003)
        log.write(f"give {time.monotonic_ns()}\\n")
        turn.give()
        time.sleep(0.0005)
    """
)


def test_turn_path_is_one_file_per_device(tmp_path: Path) -> None:
    a = turn_path(tmp_path, "GPU-8c1e1f5a-0b3c-4c1d-9e8f-000000000001")
    assert a == tmp_path / "radixkv-gpu-GPU-8c1e1f5a-0b3c-4c1d-9e8f-000000000001.turn"
    assert turn_path(tmp_path, "../evil/uuid").parent == tmp_path
    with pytest.raises(ValueError):
        turn_path(tmp_path, "")


def test_take_and_give_are_idempotent_and_counted(tmp_path: Path) -> None:
    turn = GpuTurn(tmp_path / "t.turn")
    turn.give()  # not held: nothing happens
    turn.take()
    turn.take()
    assert turn.held and turn.turns == 1 and turn.waits == 0
    turn.give()
    turn.give()
    assert not turn.held
    turn.close()
    turn.close()


def test_two_processes_never_hold_the_turn_at_once(tmp_path: Path) -> None:
    path, log = tmp_path / "dev.turn", tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(log), "40"], env=env)
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    events = sorted((int(t), kind) for kind, t in (line.split() for line in log.read_text().splitlines()))
    assert len(events) == 160
    holders = 0
    for _, kind in events:  # in time order, at most one take is open at any moment
        holders += 1 if kind == "take" else -1
        assert holders in (0, 1)


def test_a_dead_holder_does_not_keep_the_turn(tmp_path: Path) -> None:
    path = tmp_path / "dev.turn"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from pathlib import Path; "
         "from computeworker.engine.gpu_turn import GpuTurn; t = GpuTurn(Path(sys.argv[1])); t.take(); "
         "print('held', flush=True); time.sleep(60)", str(path)],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        turn = GpuTurn(path)
        holder.kill()
        holder.wait(timeout=10)
        start = time.monotonic()
        turn.take()  # would block for a live holder
        assert time.monotonic() - start < 5
        assert turn.held
        turn.close()
    finally:
        holder.kill()


class RecordingTurn(GpuTurn):
    """A real turn that also logs when it is taken and given, next to the model's calls."""

    def __init__(self, path: Path, events: list[str]) -> None:
        super().__init__(path)
        self.events = events

    def take(self) -> None:
        if not self.held:
            self.events.append("take")
        super().take()

    def give(self) -> None:
        if self.held:
            self.events.append("give")
        super().give()


class TurnAwareModel(CountingModel):
    """Takes the turn at its first launch, as CudaModelRunner's before_launch does."""

    def __init__(self, turn: GpuTurn | None, events: list[str], fail: bool = False) -> None:
        super().__init__()
        self.turn, self.events, self.fail = turn, events, fail

    def forward(self, batch, kv_pool, attention, all_logits=False):  # type: ignore[no-untyped-def]
        self.events.append("plan")
        if self.turn is not None:
            self.turn.take()
        self.events.append("launch")
        if self.fail:
            raise RuntimeError("kernel failed")
        return super().forward(batch, kv_pool, attention, all_logits)


def _engine(
    shm_pool: MappedPool, model: CountingModel, turn: GpuTurn | None, stats: list[StepStats]
) -> Engine:
    config = EngineConfig(
        page_size=4, context_len=64, prefill_chunk=16, stream_max_tokens=1, stream_interval_s=0
    )
    eng = Engine(
        model, object(), shm_pool.tensor, LetterTokenizer(), config, on_step=stats.append, gpu_turn=turn
    )  # type: ignore[arg-type]
    eng.add(
        Dispatch(
            b"r" * 16,
            ids_to_bytes([1, 2, 3]),
            0,
            b"",
            ids_to_bytes([3, 4]),
            SamplingParams(max_tokens=3),
        )
    )
    return eng


def test_a_step_holds_the_turn_from_its_first_launch_to_its_sampled_tokens(
    shm_pool: MappedPool, tmp_path: Path
) -> None:
    events: list[str] = []
    turn = RecordingTurn(tmp_path / "t.turn", events)
    stats: list[StepStats] = []
    eng = _engine(shm_pool, TurnAwareModel(turn, events), turn, stats)
    for _ in range(3):
        assert eng.step() > 0
        assert not turn.held  # given back before the step returns: the other worker may run now
    assert events == ["plan", "take", "launch", "give"] * 3
    assert turn.turns == 3 and all(st.turn_wait_s == 0.0 for st in stats)


def test_the_engine_takes_the_turn_when_the_model_did_not(shm_pool: MappedPool, tmp_path: Path) -> None:
    events: list[str] = []
    turn = RecordingTurn(tmp_path / "t.turn", events)
    eng = _engine(shm_pool, TurnAwareModel(None, events), turn, [])
    eng.step()
    assert events == ["plan", "launch", "take", "give"] and not turn.held


def test_a_failed_step_gives_the_turn_back(shm_pool: MappedPool, tmp_path: Path) -> None:
    events: list[str] = []
    turn = RecordingTurn(tmp_path / "t.turn", events)
    eng = _engine(shm_pool, TurnAwareModel(turn, events, fail=True), turn, [])
    with pytest.raises(RuntimeError):
        eng.step()
    assert not turn.held and events[-1] == "give"


def test_a_step_waiting_for_another_process_reports_the_wait(shm_pool: MappedPool, tmp_path: Path) -> None:
    path = tmp_path / "t.turn"
    other = GpuTurn(path)  # another worker of the same GPU, mid-step (flock: per open file, so per handle)
    other.take()
    turn = GpuTurn(path)
    stats: list[StepStats] = []
    eng = _engine(shm_pool, TurnAwareModel(turn, []), turn, stats)
    import threading

    threading.Timer(0.2, other.give).start()
    eng.step()
    assert turn.waits == 1 and 0.15 < stats[0].turn_wait_s < 5
    assert stats[0].turn_wait_s <= stats[0].forward_s  # the model waited inside its forward


def test_worker_flags_configure_turns(tmp_path: Path) -> None:
    cfg = config_from_args(build_parser().parse_args(["--daemon", "ipc:///tmp/x"]))
    assert cfg.gpu_turns and cfg.gpu_turn_dir == Path("/dev/shm")
    cfg = config_from_args(
        build_parser().parse_args(
            ["--daemon", "ipc:///tmp/x", "--no-gpu-turns", "--gpu-turn-dir", str(tmp_path)]
        )
    )
    assert not cfg.gpu_turns and cfg.gpu_turn_dir == tmp_path


def test_cuda_runner_takes_the_turn_after_planning() -> None:
    """CudaModelRunner's eager path calls before_launch first (graph paths: after their plan, GPU tests)."""
    from computeworker.model.cuda_runner import CudaModelRunner

    runner = CudaModelRunner.__new__(CudaModelRunner)
    calls: list[str] = []
    runner._graphs = runner._extend = None
    runner._fused = None
    runner.num_eager_steps = 0
    runner.before_launch = lambda: calls.append("take")

    class Model:
        def forward(self, batch, kv_pool, attention, all_logits=False):  # type: ignore[no-untyped-def]
            calls.append("forward")
            return torch.zeros(1)

    runner.model = Model()  # type: ignore[assignment]
    runner.forward(object(), torch.zeros(1), object())  # type: ignore[arg-type]
    assert calls == ["take", "forward"]
