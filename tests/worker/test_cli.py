from __future__ import annotations

from pathlib import Path

import pytest

from computeworker.cli import build_parser, config_from_args, main
from computeworker.config import WorkerConfig


def test_flags_and_env_build_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXKV_RUN_DIR", "/tmp/rk")
    monkeypatch.setenv("RADIXKV_MAX_RUNNING", "5")
    monkeypatch.setenv("RADIXKV_MODEL", "/models/x")
    args = build_parser().parse_args(["--prefill-chunk", "64", "--device", "cuda:1"])
    config = config_from_args(args)
    assert config == WorkerConfig(
        daemon_endpoint="ipc:///tmp/rk/workers.sock",
        model_path=Path("/models/x"),
        device="cuda:1",
        max_running=5,
        prefill_chunk=64,
    )
    assert config.resolved_dtype == "bfloat16"
    monkeypatch.setenv("RADIXKV_DAEMON_ENDPOINT", "tcp://10.0.0.2:5555")
    config = config_from_args(build_parser().parse_args(["--dtype", "float16"]))
    assert (config.daemon_endpoint, config.device, config.resolved_dtype) == (
        "tcp://10.0.0.2:5555",
        "cpu",
        "float16",
    )
    assert config.extend_attention == "auto"
    monkeypatch.setenv("RADIXKV_EXTEND_ATTENTION", "fa2")
    assert config_from_args(build_parser().parse_args([])).extend_attention == "fa2"
    assert (
        config_from_args(build_parser().parse_args(["--extend-attention", "fa3"])).extend_attention == "fa3"
    )


def test_batch_limits_default_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = config_from_args(build_parser().parse_args([]))
    gpu = config_from_args(build_parser().parse_args(["--device", "cuda:0"]))
    assert (cpu.max_running, cpu.prefill_chunk) == (16, 512)
    assert (gpu.max_running, gpu.prefill_chunk) == (256, 8192)
    explicit = config_from_args(build_parser().parse_args(["--device", "cuda:0", "--max-running", "7"]))
    assert (explicit.max_running, explicit.prefill_chunk) == (7, 8192)
    monkeypatch.setenv("RADIXKV_PREFILL_CHUNK", "0")  # compose passes 0 through: still by device
    assert config_from_args(build_parser().parse_args(["--device", "cuda:1"])).prefill_chunk == 8192


def test_extend_attention_must_be_a_known_backend() -> None:
    from computeworker.config import EXTEND_ATTENTION_CHOICES
    from computeworker.model.extend_graphs import BACKENDS

    assert EXTEND_ATTENTION_CHOICES == BACKENDS
    with pytest.raises(ValueError, match="extend_attention must be one of"):
        WorkerConfig(daemon_endpoint="ipc:///tmp/x", extend_attention="fa4")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--extend-attention", "fa4"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "gpu"], "device must be"),
        (["--daemon", "http://x"], "endpoint must be"),
        (["--max-running", "-1"], "max_running"),
        (["--prefill-chunk", "-5"], "prefill_chunk"),
        (["--dtype", "int8"], "dtype must be"),
    ],
)
def test_bad_values_exit_2_with_a_message(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(flags) == 2
    assert message in capsys.readouterr().err
