"""Where the fused MLP (computeworker.model.fused_mlp) and PDL launches (computeworker.model.triton_pdl)
apply, checked without a GPU: never on CPU tensors, and not at all when their variables say 0."""

from __future__ import annotations

import pytest
import torch

from computeworker.model import triton_pdl
from computeworker.model.fused_mlp import SplitKTiles, fused_mlp_applies, fused_mlp_enabled, linear_partials


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


def test_split_k_tiles_fit_only_whole_tiles() -> None:
    tiles = SplitKTiles(bn=64, bk=128, split=2)
    assert tiles.fits(4096, 4096) and tiles.fits(4096, 14336)
    assert not tiles.fits(4000, 4096)  # a partial column tile
    assert not tiles.fits(4096, 4000)  # K not a whole number of steps per slice


def test_linear_partials_rejects_shapes_that_do_not_fit() -> None:
    x = torch.empty(100, 4096, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not fit"):
        linear_partials(x, torch.empty(4096, 2048, dtype=torch.bfloat16), SplitKTiles())
    with pytest.raises(ValueError, match="does not fit"):
        linear_partials(x[:, :4000], torch.empty(4096, 4000, dtype=torch.bfloat16), SplitKTiles())
