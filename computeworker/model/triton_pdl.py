"""Programmatic dependent launch (PDL) for the project's Triton kernels on Hopper.

Inside a CUDA graph each kernel waits for the one before it to finish and its memory to be flushed, then
pays its own launch and ramp: ~2 us a boundary, ~0.8 ms over the 340 kernels of a cached 8B step (run 65).
A kernel launched with PDL may be scheduled while its predecessor's last CTAs still run; it must not touch
memory until `gdc_wait()` (griddepcontrol.wait) returns, which is when the predecessor has completed and
its writes are visible. Every PDL kernel here calls `gdc_wait()` before its first load or store, so the
overlap covers only the launch and the index arithmetic, and any ordering the stream had is kept.
Kernels call `gdc_launch_dependents()` once their main loop is done, letting the next kernel launch early.

`pdl_enabled(device)`: sm90+ and a Triton that has the instructions (`triton.language.extra.cuda.gdc_*`);
`RADIXKV_TRITON_PDL=0` turns it off. A launch without PDL runs the same compiled code (the wait is then a
no-op). `force` overrides the answer (benchmarks capture graphs both ways in one process).
"""

from __future__ import annotations

import functools
import os

import torch

force: bool | None = None


@functools.cache
def triton_has_gdc() -> bool:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return True


def gdc_functions() -> tuple[object, object]:
    """(gdc_wait, gdc_launch_dependents) for a kernel builder to close over, or (None, None) where Triton
    lacks them (pdl_enabled is then False, and kernels compile the PDL=False branch that never calls them)."""
    if not triton_has_gdc():
        return None, None
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    return gdc_wait, gdc_launch_dependents


def pdl_enabled(device: torch.device) -> bool:
    """Whether Triton kernels on `device` are launched with PDL."""
    if force is not None:
        return force
    if os.environ.get("RADIXKV_TRITON_PDL", "1") == "0" or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9 and triton_has_gdc()
