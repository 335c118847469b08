"""A linear layer of a few rows: y = x @ weight.T + bias for x [M, K] with M up to `MAX_ROWS` (decode steps).

Computes `reference.gemv_ref` (`torch.nn.functional.linear`). A decode step reads every weight once for a
handful of rows, so the time is the weight bytes over the memory bandwidth. Grid: one program per
`block_n` output columns; each streams its [block_n, K] slice of the weight in [block_n, block_k] tiles
(rows contiguous in memory) and multiplies the rows, padded to 16 by masked loads, on the tensor cores.
No split over K: the sums are in a fixed order, so the bits do not depend on the launch.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, wait_then_launch_dependents

MAX_ROWS = 16  # rows of x one launch takes (the padded tile of the tensor-core product)


@dataclass(frozen=True)
class GemvLaunch:
    """Tile sizes and launch shape of one `gemv` call."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _gemv_kernel(x, w, bias, y, M, N, K, s_xm, s_wn, s_ym,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 PRECISION: tl.constexpr, PDL: tl.constexpr):
    wait_then_launch_dependents(PDL)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, 16)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    x_rows = x + rm[:, None] * s_xm
    w_rows = w + rn.to(tl.int64)[:, None] * s_wn  # int64: an lm_head passes 2**31 elements
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            xt = tl.load(x_rows + k[None, :], mask=rm[:, None] < M, other=0.0)
            wt = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k_ok = k < K
            xt = tl.load(x_rows + k[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
            wt = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y + rm[:, None] * s_ym + rn[None, :], acc.to(y.dtype.element_ty), mask=(rm[:, None] < M) & n_ok[None, :])


def gemv_launch(n: int, k: int, element_size: int = 2) -> GemvLaunch:
    """The launch `gemv` uses for a weight [n, k] of `element_size`-byte elements: the fastest of
    `sparsedecode bench kernel --gemv` on Llama-3.1-8B's layers in bf16 (docs/benchmarks.md); float32 tiles
    are half as deep, to fit the pipeline's stages in shared memory."""
    block_k = (512 if n <= 4096 else 256) * 2 // element_size
    if 16384 <= n < 65536:  # gate_up-sized: wider tiles, fewer stages
        return GemvLaunch(block_n=64, block_k=block_k, num_stages=3)
    return GemvLaunch(block_n=32, block_k=block_k)


def check_gemv_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv takes x [M, K] and weight [N, K], not {tuple(x.shape)} and {tuple(weight.shape)}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"gemv takes 1 to {MAX_ROWS} rows, not {x.shape[0]}: use torch.nn.functional.linear")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], not {tuple(bias.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, weight and bias must share a dtype, not {x.dtype}, {weight.dtype}"
                         + ("" if bias is None else f", {bias.dtype}"))
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("gemv reads rows of x and of weight: their last dimension must be contiguous")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("gemv runs on CUDA tensors; on CPU tensors only in the Triton interpreter "
                           "(TRITON_INTERPRET=1); use reference.gemv_ref there")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         launch: GemvLaunch | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype, accumulated in float32; the op of
    `reference.gemv_ref`. M from 1 to `MAX_ROWS`; one Triton launch on CUDA tensors (graph-capturable), the
    interpreter on CPU ones with TRITON_INTERPRET=1 (the tests). `launch`: default `gemv_launch` of the
    weight's shape. Inside torch.compile, call `linear_rows` (the same launch as a custom op)."""
    check_gemv_args(x, weight, bias)
    launch = launch or gemv_launch(*weight.shape, x.element_size())
    return _launch(x, weight, bias, launch, pdl_launch(x.device), wrap=lambda kernel: kernel)


@torch.library.triton_op("sparsedecode::linear_rows", mutates_args=())
def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`gemv` at its default launch as a PyTorch custom op: torch.compile traces it and Inductor calls the
    kernel from its own code, with no graph break (and without dependent launch, which that path does not
    pass on)."""
    check_gemv_args(x, weight, bias)
    return _launch(x, weight, bias, gemv_launch(*weight.shape, x.element_size()), {"PDL": False},
                   wrap=torch.library.wrap_triton)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: GemvLaunch,
            pdl: dict, wrap: Callable) -> torch.Tensor:
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    wrap(_gemv_kernel)[(triton.cdiv(n, launch.block_n),)](
        x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, HAS_BIAS=bias is not None, EVEN_K=k % launch.block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32 in full, as F.linear by default
        num_warps=launch.num_warps, num_stages=launch.num_stages, **pdl)
    return y
