"""Tile sweep for the fused MLP's Triton kernels: gate_up + SiLU, the down projection as split-K partial
sums (and the output projection's shape through the same kernel), and the whole fused MLP, against
cuBLAS, at the 8B shape and 128 rows.

    PYTHONPATH=. python3 bench/fused_mlp_bench.py --out $OUT/fused_mlp.json

Each kernel runs once per layer over 32 layers' distinct weights inside one CUDA graph (as in the cached
step, so the weights come from HBM, not L2), launched with PDL where the card has it. Every configuration
is checked against a float32 reference on the first layer before it is timed; one that fails to compile
or run is reported with its error. Configurations: `computeworker.model.fused_mlp.GemmTiles` (tile width,
K step, split-K slices, pipeline stages, warps, TMA or pointer loads, warp specialization).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench.gpu_timing import copy_tbps, graph_us, run_metadata
from computeworker.model import fused_mlp
from computeworker.model.fused_mlp import GemmTiles, ShortStepTiles

M, HIDDEN, INTER, LAYERS = 128, 4096, 14336, 32

# (tile width, K step, stages, warps) with pointer loads, with TMA loads, with TMA + warp specialization
_GATE_UP_POINTER = ((64, 64, 3, 8), (64, 32, 4, 8), (32, 64, 4, 4), (128, 64, 3, 8), (128, 32, 4, 16))
_GATE_UP_TMA = (
    (64, 64, 3, 8), (64, 64, 4, 8), (64, 32, 6, 8), (64, 128, 2, 8), (32, 64, 6, 4), (128, 64, 3, 8),
    (128, 32, 4, 8), (128, 64, 3, 16), (128, 32, 5, 16),
)  # fmt: skip
_GATE_UP_WS = ((64, 64, 3, 8), (64, 32, 4, 8), (128, 64, 3, 16))
GATE_UP_CONFIGS = (
    [GemmTiles(bn, bk, 1, stages, warps) for bn, bk, stages, warps in _GATE_UP_POINTER]
    + [GemmTiles(bn, bk, 1, stages, warps, tma=True) for bn, bk, stages, warps in _GATE_UP_TMA]
    + [GemmTiles(bn, bk, 1, stages, warps, True, True) for bn, bk, stages, warps in _GATE_UP_WS]
)
# (tile width, K step, split, stages, warps), pointer and TMA loads. A first version of this sweep also had
# 256-wide tiles and warp-specialized TMA loops for these kernels; on an H200 (Triton 3.6) one of them never
# finished, so the sweep keeps to shapes measured before (bench/splitk_gemm_bench.py) plus deeper pipelines.
_SPLITK_POINTER = ((64, 128, 2, 4, 4), (128, 64, 4, 4, 8), (64, 64, 2, 6, 4))
_SPLITK_TMA = (
    (64, 128, 2, 4, 4), (64, 64, 2, 6, 4), (128, 128, 4, 3, 8), (128, 64, 4, 4, 8), (128, 64, 4, 5, 8),
    (128, 64, 4, 4, 4), (64, 64, 4, 4, 4), (32, 128, 2, 4, 4), (128, 128, 2, 3, 8),
)  # fmt: skip
SPLITK_CONFIGS = [GemmTiles(*c) for c in _SPLITK_POINTER] + [GemmTiles(*c, tma=True) for c in _SPLITK_TMA]


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected).abs().max() / expected.abs().max())


def timed(
    config: Any, run: Callable[[int], torch.Tensor], expected: torch.Tensor | None, weight_mb: float
) -> dict[str, Any]:
    """Check `run(0)` against `expected` (unless None), then time `run(layer)` over every layer in one
    graph."""
    row: dict[str, Any] = {"config": asdict(config) if config is not None else "cublas"}
    print("  running", row["config"], file=sys.stderr, flush=True)  # a hang names its configuration
    try:
        if expected is not None:
            row["rel_err"] = rel_err(run(0), expected)
        row["us"] = graph_us(lambda: [run(i) for i in range(LAYERS)], LAYERS)
        row["tbps"] = weight_mb / row["us"]
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((r for r in rows if "us" in r), key=lambda r: r["us"]) + [r for r in rows if "us" not in r]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/fused_mlp.json"))
    parser.add_argument("--parts", default="gate_up,down,o,mlp")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16()

    x = randn(M, HIDDEN)
    act_in = randn(M, INTER)
    gate_up_w = [randn(2 * INTER, HIDDEN, scale=HIDDEN**-0.5) for _ in range(LAYERS)]
    down_w = [randn(HIDDEN, INTER, scale=INTER**-0.5) for _ in range(LAYERS)]
    o_w = [randn(HIDDEN, HIDDEN, scale=HIDDEN**-0.5) for _ in range(LAYERS)]
    result: dict[str, Any] = {"meta": run_metadata(), "copy_tbps": copy_tbps(), "defaults": {}}
    result["defaults"] = asdict(fused_mlp.TILES)

    def save(name: str, rows: list[dict[str, Any]], started: float) -> None:
        result[name] = {"sweep_s": time.perf_counter() - started, "rows": ranked(rows)}
        best = result[name]["rows"][:3]
        print(name, [(r["config"], round(r.get("us", -1), 2)) for r in best], file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each part: a timeout keeps some

    if "gate_up" in parts:
        started = time.perf_counter()
        g, u = gate_up_w[0].float().chunk(2, dim=0)
        expected = torch.nn.functional.silu(x.float() @ g.T) * (x.float() @ u.T)
        mb = 2 * INTER * HIDDEN * 2 / 1e6
        rows = [
            timed(
                None,
                lambda i: torch.nn.functional.silu((h := x @ gate_up_w[i].T)[:, :INTER]) * h[:, INTER:],
                expected,
                mb,
            )
        ]
        rows += [
            timed(c, lambda i, c=c: fused_mlp.gate_up_silu(x, gate_up_w[i], c), expected, mb)
            for c in GATE_UP_CONFIGS
        ]
        save("gate_up", rows, started)

    for name, inp, weights in (("down", act_in, down_w), ("o", x, o_w)):
        if name not in parts:
            continue
        started = time.perf_counter()
        expected = inp.float() @ weights[0].float().T
        mb = weights[0].numel() * 2 / 1e6
        rows = [timed(None, lambda i, inp=inp, weights=weights: inp @ weights[i].T, expected, mb)]
        for c in SPLITK_CONFIGS:
            if c.fits(weights[0].shape[0], weights[0].shape[1]):
                rows.append(
                    timed(
                        c,
                        lambda i, c=c, inp=inp, weights=weights: fused_mlp.linear_partials(
                            inp, weights[i], c
                        ).sum(0),
                        expected,
                        mb,
                    )
                )
        save(name, rows, started)

    if "mlp" in parts and "gate_up" in result and "down" in result:
        # The whole MLP (gate_up + down + the add + RMSNorm that reduces it) for the best three of each.
        started = time.perf_counter()
        top_gate = [r for r in result["gate_up"]["rows"] if "us" in r and r["config"] != "cublas"][:3]
        top_down = [r for r in result["down"]["rows"] if "us" in r and r["config"] != "cublas"][:3]
        residual = randn(M, HIDDEN)
        norm_w = randn(HIDDEN)
        mb = 3 * INTER * HIDDEN * 2 / 1e6
        candidates = [
            ShortStepTiles(GemmTiles(**gr["config"]), GemmTiles(**dr["config"]))
            for gr in top_gate
            for dr in top_down
        ]
        rows = []
        for tiles in [*candidates, fused_mlp.TILES]:
            row = timed(
                tiles.gate_up,
                lambda i, tiles=tiles: fused_mlp.add_partials_rmsnorm(
                    fused_mlp.mlp_partials(x, gate_up_w[i], down_w[i], tiles), residual, norm_w, 1e-5
                ),
                None,  # each part was checked against fp32 above
                mb,
            )
            row.update(down=asdict(tiles.down), current_default=tiles == fused_mlp.TILES)
            rows.append(row)
        save("mlp", rows, started)
    best = {name: best_config(result, name) for name in ("gate_up", "down")}
    if all(best.values()):
        result["best_tiles"] = best
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def best_config(result: dict[str, Any], part: str) -> dict[str, Any] | None:
    """The fastest Triton configuration of a part that ran, within 1% of the float32 reference."""
    rows = result.get(part, {}).get("rows", [])
    ok = [r for r in rows if "us" in r and r["config"] != "cublas" and r["rel_err"] < 1e-2]
    return ok[0]["config"] if ok else None


def tiles_from(path: Path) -> ShortStepTiles:
    """The sweep's best tiles (its `best_tiles`), for a benchmark variant that runs them."""
    best = json.loads(path.read_text())["best_tiles"]
    return ShortStepTiles(GemmTiles(**best["gate_up"]), GemmTiles(**best["down"]))


if __name__ == "__main__":
    main()
