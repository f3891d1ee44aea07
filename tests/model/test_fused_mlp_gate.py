"""Where the fused MLP (computeworker.model.fused_mlp) and PDL launches (computeworker.model.triton_pdl)
apply, checked without a GPU: never on CPU tensors, and not at all when their variables say 0."""

from __future__ import annotations

import pytest
import torch

from computeworker.model import triton_pdl
from computeworker.model.fused_mlp import fused_mlp_applies, fused_mlp_enabled


def test_cpu_tensors_keep_the_torch_mlp() -> None:
    x = torch.empty(100, 4096, dtype=torch.bfloat16)
    assert not fused_mlp_applies(100, 4096, 14336, x)


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXKV_FUSED_MLP", "0")
    assert not fused_mlp_enabled()


def test_pdl_never_on_cpu_and_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not triton_pdl.pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("RADIXKV_TRITON_PDL", "0")
    assert not triton_pdl.pdl_enabled(torch.device("cuda", 0))  # decided before the device is asked
