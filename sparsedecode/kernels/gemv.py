"""A linear layer of a few rows: y = x @ weight.T + bias for x [M, K] with M up to `MAX_ROWS` (decode steps).

Computes `reference.gemv_ref` (`torch.nn.functional.linear`). A decode step reads every weight once for a
handful of rows, so the time is the weight bytes over the memory bandwidth. Grid: one program per
`block_n` output columns; each streams its [block_n, K] slice of the weight in [block_n, block_k] tiles
(rows contiguous in memory) and multiplies the rows, padded to 16 by masked loads, on the tensor cores.
No split over K: the sums are in a fixed order, so the bits do not depend on the launch.

Two variants read their input through a prologue instead of from one tensor, so the element-wise kernel that
would make it (and its launch) goes: `add_rmsnorm_linear_rows` sums the residual stream's parts, stores the
sum and multiplies it by the RMSNorm weight on load, scaling each row by its 1/rms after the loop (the rms
accumulates from the same tiles); `silu_mul_linear_rows` takes [gate | up] and multiplies silu(gate) by up
on load (`reference.add_rmsnorm_gemv_ref`, `reference.silu_mul_gemv_ref`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, wait_then_launch_dependents

MAX_ROWS = 16  # rows of x one launch takes (the padded tile of the tensor-core product)
HOPPER_SHARED_MEMORY = 232448  # bytes of shared memory a program may use on an H100 / H200


@dataclass(frozen=True)
class GemvLaunch:
    """Tile sizes and launch shape of one `gemv` call."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4


#: what `_gemv_kernel` reads as its input rows: x; RMSNorm(x + residuals); silu(x[:, :K]) * x[:, K:]
PLAIN, ADD_RMSNORM, SILU_MUL = 0, 1, 2


@triton.jit
def _gemv_kernel(x, r1, r2, norm_w, x_sum, w, bias, y, cos, sin, M, N, K, s_xm, s_wn, s_ym, s_cm, eps, rope_n,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 PRECISION: tl.constexpr, PDL: tl.constexpr, PROLOGUE: tl.constexpr, RESIDUALS: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    wait_then_launch_dependents(PDL)
    pid = tl.program_id(0)
    if HEAD_DIM:  # RoPE: 16 columns of a head's first half and their partners of its second (BLOCK_N is 32)
        col = tl.arange(0, BLOCK_N)
        head, group = pid // (HEAD_DIM // 32), pid % (HEAD_DIM // 32)
        rn = head * HEAD_DIM + group * 16 + col % 16 + (col // 16) * (HEAD_DIM // 2)
    else:
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, 16)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    m_ok = rm < M
    x_rows = x + rm[:, None] * s_xm
    w_rows = w + rn.to(tl.int64)[:, None] * s_wn  # int64: an lm_head passes 2**31 elements
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((16,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            x_ok = m_ok[:, None]
            w_ok = n_ok[:, None]
        else:
            x_ok = m_ok[:, None] & (k < K)[None, :]
            w_ok = n_ok[:, None] & (k < K)[None, :]
        if PROLOGUE == 1:  # ADD_RMSNORM
            part = tl.load(x_rows + k[None, :], mask=x_ok, other=0.0)
            total = part.to(tl.float32) + tl.load(r1 + rm[:, None] * s_xm + k[None, :], mask=x_ok,
                                                  other=0.0).to(tl.float32)
            if RESIDUALS == 2:
                total += tl.load(r2 + rm[:, None] * s_xm + k[None, :], mask=x_ok, other=0.0).to(tl.float32)
            stored = total.to(part.dtype)  # the residual stream, as stored
            tl.store(x_sum + rm[:, None] * K + k[None, :], stored, mask=x_ok & (pid == 0))
            total = stored.to(tl.float32)
            squares += tl.sum(total * total, axis=1)
            scale = tl.load(norm_w + k, mask=k < K, other=0.0).to(tl.float32)
            xt = (total * scale[None, :]).to(part.dtype)
        elif PROLOGUE == 2:  # SILU_MUL
            gate = tl.load(x_rows + k[None, :], mask=x_ok, other=0.0)
            up = tl.load(x_rows + K + k[None, :], mask=x_ok, other=0.0).to(tl.float32)
            xt = (gate.to(tl.float32) * tl.sigmoid(gate.to(tl.float32)) * up).to(gate.dtype)
        else:
            xt = tl.load(x_rows + k[None, :], mask=x_ok, other=0.0)
        wt = tl.load(w_rows + k[None, :], mask=w_ok, other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    if PROLOGUE == 1:
        acc *= tl.rsqrt(squares / K + eps)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HEAD_DIM:  # out = acc * cos + rotate_half(acc) * sin on the first rope_n columns (q and k)
        d = rn % HEAD_DIM
        c = tl.load(cos + rm[:, None] * s_cm + d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        s = tl.load(sin + rm[:, None] * s_cm + d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (16, 2, 16)), (0, 2, 1)))
        partner = tl.reshape(tl.permute(tl.join(hi, lo), (0, 2, 1)), (16, BLOCK_N))
        sign = tl.where(col < 16, -1.0, 1.0)
        acc = tl.where((rn < rope_n)[None, :], acc * c + sign[None, :] * partner * s, acc)
    tl.store(y + rm[:, None] * s_ym + rn[None, :], acc.to(y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemv_launch(n: int, k: int, element_size: int = 2, x_tiles: int = 1,
                shared_memory: int = HOPPER_SHARED_MEMORY) -> GemvLaunch:
    """The launch `gemv` uses for a weight [n, k] of `element_size`-byte elements: the fastest of
    `sparsedecode bench kernel --gemv` on Llama-3.1-8B's layers in bf16 (docs/benchmarks.md), its tiles made
    shallower until `buffered_bytes` (with `x_tiles` input tensors read per tile) fit `shared_memory`."""
    launch = GemvLaunch(block_n=32, block_k=512 if n <= 4096 else 256)
    if 16384 <= n < 65536:  # gate_up-sized: wider tiles, fewer stages
        launch = GemvLaunch(block_n=64, block_k=256, num_stages=3)
    while launch.block_k > 16 and buffered_bytes(launch, element_size, x_tiles) > shared_memory:
        launch = dataclasses.replace(launch, block_k=launch.block_k // 2)
    return launch


def buffered_bytes(launch: GemvLaunch, element_size: int, x_tiles: int = 1) -> int:
    """Shared memory of a launch: Triton's pipeline holds num_stages - 1 tiles of each input (16 padded rows
    each, plus a norm weight row) and of the weight."""
    rows = 16 * x_tiles + (x_tiles > 1) + launch.block_n
    return rows * launch.block_k * element_size * (launch.num_stages - 1)


@functools.cache
def shared_memory_of(device: torch.device) -> int:
    """Bytes of shared memory a program may use on `device` (the interpreter's CPU: an H200's)."""
    if device.type != "cuda":
        return HOPPER_SHARED_MEMORY
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


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
    return _launch(x, weight, bias, wrap=lambda kernel: kernel, launch=launch, pdl=True)


@torch.library.triton_op("sparsedecode::linear_rows", mutates_args=())
def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                pdl: bool = False) -> torch.Tensor:
    """`gemv` at its default launch as a PyTorch custom op: torch.compile traces it and Inductor calls the
    kernel from its own code, with no graph break. `pdl`: launch dependently where `kernels.pdl` does (only
    outside torch.compile: Inductor's call of the kernel does not pass that on)."""
    check_gemv_args(x, weight, bias)
    return _launch(x, weight, bias, wrap=torch.library.wrap_triton, pdl=pdl)


@torch.library.triton_op("sparsedecode::add_rmsnorm_linear_rows", mutates_args=())
def add_rmsnorm_linear_rows(x: torch.Tensor, residual: torch.Tensor, residual2: torch.Tensor | None,
                            norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                            bias: torch.Tensor | None = None, pdl: bool = False, cos: torch.Tensor | None = None,
                            sin: torch.Tensor | None = None,
                            rope_columns: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): the residual stream s = x + residual (+ residual2), all [M, K], and the linear layer of its
    RMSNorm (weight `norm_weight` [K], `eps`), in one launch: `reference.add_rmsnorm_gemv_ref`. With `cos`
    and `sin` [M, head_dim] (head_dim a multiple of 32 dividing N) the first `rope_columns` of y, heads of
    head_dim, come out rotated (a qkv projection's q and k). A custom op as `linear_rows`."""
    check_gemv_args(x, weight, bias)
    for r in (residual, residual2):
        if r is not None and (r.shape != x.shape or r.stride() != x.stride() or r.dtype != x.dtype):
            raise ValueError(f"the residuals must have x's shape, strides and dtype ({tuple(x.shape)}, "
                             f"{x.stride()}, {x.dtype}), not {tuple(r.shape)}, {r.stride()}, {r.dtype}")
    if norm_weight.shape != (x.shape[1],):
        raise ValueError(f"norm_weight must be [{x.shape[1]}], not {tuple(norm_weight.shape)}")
    if cos is not None:
        check_rope_args(x, weight, cos, sin, rope_columns)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = _launch(x, weight, bias, wrap=torch.library.wrap_triton, prologue=ADD_RMSNORM,
                residuals=(residual, residual2), norm_weight=norm_weight, total=total, eps=eps, pdl=pdl,
                rope=None if cos is None else (cos, sin, rope_columns))
    return total, y


def check_rope_args(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None,
                    rope_columns: int) -> None:
    head_dim = cos.shape[-1]
    if sin is None or cos.shape != (x.shape[0], head_dim) or sin.shape != cos.shape or cos.stride() != sin.stride():
        raise ValueError(f"cos and sin must both be [{x.shape[0]}, head_dim] with the same strides, not "
                         f"{tuple(cos.shape)} and {None if sin is None else tuple(sin.shape)}")
    if cos.stride(1) != 1 or head_dim % 32 or weight.shape[0] % head_dim or rope_columns % head_dim:
        raise ValueError(f"the rotated projection needs contiguous rows of cos/sin, a head_dim that is a multiple of "
                         f"32 and divides its {weight.shape[0]} columns and the {rope_columns} rotated ones, not "
                         f"{head_dim}")


@torch.library.triton_op("sparsedecode::silu_mul_linear_rows", mutates_args=())
def silu_mul_linear_rows(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         pdl: bool = False) -> torch.Tensor:
    """The linear layer of silu(gate) * up for gate_up = [gate | up] [M, 2K] and weight [N, K], in one launch:
    `reference.silu_mul_gemv_ref`. A custom op as `linear_rows`."""
    k = weight.shape[1]
    if gate_up.dim() != 2 or gate_up.shape[1] != 2 * k:
        raise ValueError(f"gate_up must be [M, {2 * k}] for weight {tuple(weight.shape)}, not {tuple(gate_up.shape)}")
    check_gemv_args(gate_up[:, :k], weight, bias)
    return _launch(gate_up, weight, bias, wrap=torch.library.wrap_triton, prologue=SILU_MUL, pdl=pdl)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wrap: Callable,
            launch: GemvLaunch | None = None, pdl: bool = False, prologue: int = PLAIN,
            residuals: tuple[torch.Tensor | None, ...] = (None, None), norm_weight: torch.Tensor | None = None,
            total: torch.Tensor | None = None, eps: float = 0.0,
            rope: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
    m, (n, k) = x.shape[0], weight.shape
    r1, r2 = residuals
    x_tiles = {PLAIN: 1, ADD_RMSNORM: 2 if r2 is None else 3, SILU_MUL: 2}[prologue]
    launch = launch or gemv_launch(n, k, x.element_size(), x_tiles, shared_memory_of(x.device))
    cos, sin, rope_n = rope or (x, x, 0)
    if rope:
        launch = dataclasses.replace(launch, block_n=32)  # the kernel pairs 16 columns with 16 others
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    wrap(_gemv_kernel)[(triton.cdiv(n, launch.block_n),)](
        x, x if r1 is None else r1, x if r2 is None else r2, weight if norm_weight is None else norm_weight,
        y if total is None else total, weight, bias if bias is not None else weight, y, cos, sin, m, n, k,
        x.stride(0), weight.stride(0), y.stride(0), cos.stride(0), eps, rope_n,
        BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, HAS_BIAS=bias is not None, EVEN_K=k % launch.block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32 in full, as F.linear by default
        num_warps=launch.num_warps, num_stages=launch.num_stages, PROLOGUE=prologue,
        RESIDUALS=1 if r2 is None else 2, HEAD_DIM=cos.shape[-1] if rope else 0,
        **(pdl_launch(x.device) if pdl else {"PDL": False}))
    return y
