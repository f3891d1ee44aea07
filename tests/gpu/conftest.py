"""GPU tests: every test here is marked `gpu` and skipped unless CUDA and FlashInfer are usable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if importlib.util.find_spec("flashinfer") is None:
        return "needs flashinfer (pip install flashinfer-python)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    for item in items:
        if _HERE not in Path(str(item.fspath)).parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
