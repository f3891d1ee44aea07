"""cachemgr serve configuration: flag > RADIXKV_* env > default, validation, derived paths."""

from __future__ import annotations

import pytest

from cachemgr.config import build_config, build_parser


def test_defaults_derive_paths_from_the_run_dir() -> None:
    config = build_config([], {"RADIXKV_RUN_DIR": "/tmp/rk"})
    assert (config.run_dir, config.worker_endpoint, config.admin_socket) == (
        "/tmp/rk",
        "ipc:///tmp/rk/workers.sock",
        "/tmp/rk/admin.sock",
    )
    assert (config.http_host, config.http_port, config.kv_budget, config.page_size, config.num_pages) == (
        "127.0.0.1",
        8000,
        512 * 2**20,
        16,
        None,
    )
    assert (config.pool_kind, config.resolved_kv_dtype, config.log_level) == ("shm", "float32", "INFO")


def test_flag_wins_over_env_which_wins_over_default() -> None:
    env = {
        "RADIXKV_HTTP_PORT": "9000",
        "RADIXKV_PAGE_SIZE": "32",
        "RADIXKV_API_KEYS": "a, b",
        "RADIXKV_DISABLE_HTTP": "yes",
    }
    config = build_config(["--http-port", "0", "--log-level", "debug"], env)
    assert (config.http_port, config.page_size, config.api_keys, config.disable_http, config.log_level) == (
        0,
        32,
        ("a", "b"),
        True,
        "DEBUG",
    )


def test_gpu_device_picks_cuda_ipc_and_bfloat16() -> None:
    config = build_config(["--device", "cuda:1", "--kv-budget", "8GiB"], {})
    assert (config.pool_kind, config.resolved_kv_dtype, config.kv_budget) == (
        "cuda_ipc",
        "bfloat16",
        8 * 2**30,
    )
    assert config.daemon_settings().endpoint == config.worker_endpoint
    assert config.daemon_settings().dispatch == "pack"  # workers of a GPU pool share that GPU


def test_dispatch_defaults_to_spread_on_cpu_and_follows_the_flag() -> None:
    assert build_config([], {}).daemon_settings().dispatch == "spread"
    assert build_config(["--dispatch", "pack"], {}).daemon_settings().dispatch == "pack"
    assert (
        build_config(["--device", "cuda:0"], {"RADIXKV_DISPATCH": "spread"}).daemon_settings().dispatch
        == "spread"
    )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--log-level", "loud"], {}, "log level"),
        (
            ["--heartbeat-interval", "5", "--heartbeat-timeout", "1"],
            {},
            "heartbeat_interval_s < heartbeat_timeout_s",
        ),
        (["--worker-endpoint", "udp://x"], {}, "ipc:// or tcp://"),
        (["--admin-tcp-port", "9999"], {}, "needs --admin-token"),
        (["--admin-tcp-port", "9999", "--admin-token", "fifteen-chars!!"], {}, "at least 16 characters"),
        ([], {"RADIXKV_KV_BUDGET": "huge"}, "RADIXKV_KV_BUDGET"),
        (["--kv-dtype", "int8"], {}, "kv dtype"),
        (["--eviction-policy", "random"], {}, "eviction policy"),
        (["--dispatch", "random"], {}, "dispatch must be"),
    ],
)
def test_bad_values_raise_value_error(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_config(argv, env)


def test_help_names_every_env_var() -> None:
    text = build_parser().format_help()
    for var in (
        "RADIXKV_HTTP_PORT",
        "RADIXKV_KV_BUDGET",
        "RADIXKV_WORKER_ENDPOINT",
        "RADIXKV_HEARTBEAT_TIMEOUT",
    ):
        assert var in text
