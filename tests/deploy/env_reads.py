"""Which RADIXKV_* environment variables the code reads, found by running the code's own option
builders against an environment that records every lookup (no hand-kept list to fall out of date)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch


class RecordingEnv(dict[str, str]):
    """An empty environment that remembers every key looked up in it."""

    def __init__(self) -> None:
        super().__init__()
        self.looked_up: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.looked_up.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.looked_up.add(key)
        return super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.looked_up.add(key)
        return super().get(key, default)


def _reads(call: Callable[[RecordingEnv], object], monkeypatch: Any) -> set[str]:
    """Run `call` with the recording env both passed in and installed as os.environ (code reads it
    either way), and return the RADIXKV_* names it looked up."""
    env = RecordingEnv()
    with monkeypatch.context() as patch:
        patch.setattr(os, "environ", env)
        call(env)
    return {name for name in env.looked_up if name.startswith("RADIXKV_")}


def daemon_reads(monkeypatch: Any) -> set[str]:
    """`cachemgr serve` options (cachemgr/config.py), plus the embedded model's cache directory."""
    from cachemgr.config import build_config
    from shared.default_model import default_cache_dir

    def call(env: RecordingEnv) -> None:
        build_config([], env)
        default_cache_dir()

    return _reads(call, monkeypatch)


def worker_reads(monkeypatch: Any) -> set[str]:
    """`computeworker` options (computeworker/cli.py, computeworker/config.py), the model cache and the
    CUDA kernel switches (rope_store.py, fused_mlp.py, triton_pdl.py in computeworker/model)."""
    from computeworker.cli import build_parser
    from computeworker.model.fused_mlp import fused_mlp_enabled
    from computeworker.model.rope_store import fused_rope_store_enabled
    from computeworker.model.triton_pdl import pdl_enabled
    from shared.default_model import default_cache_dir

    def call(env: RecordingEnv) -> None:
        build_parser()
        default_cache_dir()
        fused_rope_store_enabled(32, 8, 128)
        fused_mlp_enabled()
        pdl_enabled(torch.device("cpu"))

    return _reads(call, monkeypatch)


def admin_reads(monkeypatch: Any) -> set[str]:
    """`cachemgr admin` connection options (the worker healthcheck and operators use it)."""
    from cachemgr.admin.cli import build_parser

    return _reads(lambda env: build_parser(env), monkeypatch)
