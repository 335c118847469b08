"""The projections of a decode step (a few rows against a large weight): one Triton launch per linear.

Computes `F.linear(x, weight, bias)` for x [M, K] with M <= `MAX_ROWS`, weight [N, K] (K contiguous),
fp32 accumulation, the result in x's dtype. At these M a linear reads its weight once and does almost no
arithmetic, so its time is the weight's bytes over the memory bandwidth plus the kernel's ramp and tail.
Each program owns `block_n` output columns over the whole K (no split-K pass, so no second launch to reduce
partial sums) and streams its weight rows in [block_n, block_k] tiles through a deep software pipeline;
the rows of x ride along in a 16-row tile of the tensor-core product.

Registered as the operator `sparsedecode::decode_linear`, so a `torch.compile`d decode step calls it
without a graph break; on CPU tensors it needs TRITON_INTERPRET=1 (tests only).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

#: most rows of x the kernel takes (one 16-row tile of the product)
MAX_ROWS = 16


@dataclass(frozen=True)
class LinearLaunch:
    """Tiles and pipelining of the kernel; any values compute the same op (up to the order of the
    fp32 sums over K, which depends on block_k)."""

    block_n: int = 32  # output columns per program
    block_k: int = 256  # weight elements per row and tile
    num_stages: int = 4
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LinearLaunch.{name} must be a positive integer, not {value!r}")
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"LinearLaunch.{name} must be a power of 2 of at least 16, not {value}")


LINEAR_LAUNCH = LinearLaunch()


@triton.jit
def _decode_linear_kernel(x, w, bias, y, M, N, stride_xm, stride_wn, stride_ym, K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    m_ok = m < M
    n_ok = n < N
    x_tile = x + m[:, None] * stride_xm + k[None, :]
    w_tile = w + n[:, None].to(tl.int64) * stride_wn + k[None, :]  # lm_head-sized weights pass 2**31
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_tile, mask=m_ok[:, None], other=0.0)
            if EVEN_N:
                wt = tl.load(w_tile)
            else:
                wt = tl.load(w_tile, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + k) < K
            xt = tl.load(x_tile, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_tile, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc)
        x_tile += BLOCK_K
        w_tile += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y + m[:, None] * stride_ym + n[None, :], acc.to(y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def check_decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ValueError unless `decode_linear` takes these arguments."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"decode_linear needs x [M, K] and weight [N, K], not {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"decode_linear takes at most {MAX_ROWS} rows, not {x.shape[0]}: use F.linear")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("decode_linear needs x and weight with a contiguous last dimension")
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"decode_linear takes bfloat16 or float16 x and weight of one dtype, not {x.dtype} "
                         f"and {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{weight.shape[0]}], not {tuple(bias.shape)}")


@torch.library.triton_op("sparsedecode::decode_linear", mutates_args=())
def _decode_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      block_n: int, block_k: int, num_stages: int, num_warps: int) -> torch.Tensor:
    rows, depth = x.shape
    cols = weight.shape[0]
    y = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    torch.library.wrap_triton(_decode_linear_kernel)[(triton.cdiv(cols, block_n),)](
        x, weight, bias if bias is not None else x, y, rows, cols, x.stride(0), weight.stride(0), y.stride(0), K=depth,
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=depth % block_k == 0, EVEN_N=cols % block_n == 0, num_stages=num_stages, num_warps=num_warps)
    return y


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  launch: LinearLaunch = LINEAR_LAUNCH) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [M <= MAX_ROWS, K] in one Triton launch (see the module)."""
    check_decode_linear(x, weight, bias)
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 before importing triton")
    return _decode_linear_op(x, weight, bias, launch.block_n, launch.block_k, launch.num_stages, launch.num_warps)


def decode_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: the linear in float32, rounded to x's dtype once."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
