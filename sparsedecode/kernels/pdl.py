"""Programmatic dependent launch (Hopper and later) for the decode step's kernels.

With it a kernel is launched while the kernel before it on the stream drains: its programs wait at their top
for the earlier writes (`gdc_wait`), then let the next kernel launch (`gdc_launch_dependents`), so
consecutive kernels overlap their ramp and tail instead of paying both. The results are the same bits.
On for CUDA devices of compute capability 9 or more; `SPARSEDECODE_PDL=0` turns it off (for ours and, through
`Transformer.compile_decode`, Inductor's kernels).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_CAPABLE: dict[torch.device, bool] = {}


def pdl_enabled(device: torch.device) -> bool:
    """Whether this device's launches use programmatic dependent launch (never in the CPU interpreter)."""
    if os.environ.get("SPARSEDECODE_PDL", "1") == "0" or device.type != "cuda":
        return False
    if device not in _CAPABLE:
        _CAPABLE[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return _CAPABLE[device]


def pdl_launch(device: torch.device) -> dict:
    """The kernel arguments for a launch on `device`: the `PDL` constexpr and Triton's launch option."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


@triton.jit
def wait_then_launch_dependents(PDL: tl.constexpr):
    """A kernel's first statement: with `PDL` (launched while the kernel before it drains), wait for that
    kernel's writes, then let the next kernel launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
