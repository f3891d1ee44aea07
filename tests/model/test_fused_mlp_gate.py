"""Where the fused MLP (computeworker.model.fused_mlp) and PDL launches (computeworker.model.triton_pdl)
apply, checked without a GPU: never on CPU tensors, and not at all when their variables say 0."""

from __future__ import annotations

import pytest
import torch

from computeworker.model import triton_pdl
from computeworker.model.fused_mlp import GemmTiles, fused_mlp_applies, fused_mlp_enabled, linear_partials


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
    tiles = GemmTiles(bn=64, bk=128, split=2)
    assert tiles.fits(4096, 4096) and tiles.fits(4096, 14336)
    assert not tiles.fits(4000, 4096)  # a partial column tile
    assert not tiles.fits(4096, 4000)  # K not a whole number of steps per slice


def test_linear_partials_rejects_shapes_that_do_not_fit() -> None:
    x = torch.empty(100, 4096, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not fit"):
        linear_partials(x, torch.empty(4096, 2048, dtype=torch.bfloat16), GemmTiles())
    with pytest.raises(ValueError, match="does not fit"):
        linear_partials(x[:, :4000], torch.empty(4096, 4000, dtype=torch.bfloat16), GemmTiles())


def test_launches_follow_the_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid, pipeline depth, warps and load kind of each launch come from ShortStepTiles (kernels
    recorded instead of run: the GPU tests run them)."""
    import contextlib

    from computeworker.model import fused_mlp

    launches: list[tuple[str, tuple[int, ...], dict[str, object]]] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: tuple[int, ...]):
            return lambda *args, **options: launches.append((self.name, grid, options))

    monkeypatch.setattr(
        fused_mlp, "_kernels", {k: Recorder(k) for k in ("gate_up", "gate_up_tma", "partials")}
    )
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    x = torch.zeros(100, 4096, dtype=torch.bfloat16)
    gate_up, down = (
        torch.zeros(2 * 14336, 4096, dtype=torch.bfloat16),
        torch.zeros(4096, 14336, dtype=torch.bfloat16),
    )
    tiles = fused_mlp.ShortStepTiles(
        GemmTiles(bn=128, stages=4, tma=True), GemmTiles(bk=128, split=4, warps=4)
    )
    partials = fused_mlp.mlp_partials(x, gate_up, down, tiles)
    assert partials.shape == (4, 100, 4096)
    (gate_name, gate_grid, gate_opts), (down_name, down_grid, down_opts) = launches
    assert (gate_name, gate_grid, gate_opts["BN"], gate_opts["num_stages"]) == (
        "gate_up_tma",
        (112, 1),
        128,
        4,
    )
    assert (down_name, down_grid, down_opts["SPLIT"], down_opts["num_warps"]) == (
        "partials",
        (64, 1, 4),
        4,
        4,
    )
    with pytest.raises(ValueError, match="do not fit"):
        fused_mlp.gate_up_silu(x, gate_up, GemmTiles(split=2))
