"""Moving KV blocks into a staging pool: every listed (block, KV head) slab of K and V in one launch.

Computes `gather_host_blocks_ref`. A slab is one (block, KV head) of a pool: `block_size * head_dim`
contiguous elements. The four pools are given as 2-D views `[slabs, slab_elements]`; move i copies slab
`src_slabs[i]` of the sources to slab `dst_slabs[i]` of the targets, for K and V together, and moves
with `src_slabs[i] < 0` are skipped. A caller therefore hands a fixed-size list of moves (one per list
entry that might be missing) and nothing syncs with the host: the launch can be captured in a CUDA graph.

A source may lie in pinned host memory mapped into the device's address space (`cudaHostRegister` with
the mapped flag, or PyTorch's pinned tensors): the kernel then reads it over the host link in place
(zero-copy), so one launch moves every missing block of a layer, where copies through a staging buffer
take a host-side gather and one copy per run of consecutive blocks. Grid (moves, tiles of a slab).
"""
from __future__ import annotations

import os
from typing import Literal

import torch
import triton
import triton.language as tl

#: slab elements one program copies (of K and of V)
TILE_ELEMENTS = 2048


@triton.jit
def _gather_kernel(k_src, v_src, k_dst, v_dst, src_slabs, dst_slabs, s_ks, s_vs, s_kd, s_vd, E,
                   BLOCK: tl.constexpr):
    i = tl.program_id(0)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(src_slabs + i).to(tl.int64)
    dst = tl.load(dst_slabs + i).to(tl.int64)
    ok = (e < E) & (src >= 0)
    tl.store(k_dst + dst * s_kd + e, tl.load(k_src + src * s_ks + e, mask=ok), mask=ok)
    tl.store(v_dst + dst * s_vd + e, tl.load(v_src + src * s_vs + e, mask=ok), mask=ok)


def gather_host_blocks_ref(k_src: torch.Tensor, v_src: torch.Tensor, k_dst: torch.Tensor, v_dst: torch.Tensor,
                           src_slabs: torch.Tensor, dst_slabs: torch.Tensor) -> None:
    """k_dst[dst_slabs[i]] = k_src[src_slabs[i]] (and the same for V) for every i with src_slabs[i] >= 0.
    Pools are 2-D `[slabs, slab_elements]`; the targets of the moves must be distinct."""
    moved = src_slabs >= 0
    src, dst = src_slabs[moved].long(), dst_slabs[moved].long()
    k_dst[dst.to(k_dst.device)] = k_src[src.to(k_src.device)].to(k_dst.device)
    v_dst[dst.to(v_dst.device)] = v_src[src.to(v_src.device)].to(v_dst.device)


def gather_host_blocks(k_src: torch.Tensor, v_src: torch.Tensor, k_dst: torch.Tensor, v_dst: torch.Tensor,
                       src_slabs: torch.Tensor, dst_slabs: torch.Tensor, *,
                       backend: Literal["auto", "triton", "reference"] = "auto") -> None:
    """The moves of `gather_host_blocks_ref` (read its docstring), K and V in one launch.

    backend "auto" runs Triton when the targets are CUDA tensors (the sources on the device or in
    mapped pinned host memory; no host synchronisation: graph-capturable) and the reference otherwise;
    "triton" on CPU tensors needs TRITON_INTERPRET=1 (the tests)."""
    pools = (k_src, v_src, k_dst, v_dst)
    width = k_dst.shape[-1]
    if any(p.dim() != 2 or p.shape[1] != width or p.stride(1) != 1 for p in pools):
        raise ValueError("the pools must be 2-D [slabs, slab_elements] views of one slab width with a contiguous "
                         f"last dimension, not {[tuple(p.shape) for p in pools]}")
    if len({p.dtype for p in pools}) != 1:
        raise ValueError(f"the pools must share a dtype, not {[p.dtype for p in pools]}")
    if (src_slabs.dim() != 1 or src_slabs.shape != dst_slabs.shape or src_slabs.is_floating_point()
            or dst_slabs.is_floating_point()):
        raise ValueError(f"src_slabs and dst_slabs must be 1-D integer tensors of one length, not "
                         f"{tuple(src_slabs.shape)} {src_slabs.dtype} and {tuple(dst_slabs.shape)} {dst_slabs.dtype}")
    if backend == "auto":
        backend = "triton" if k_dst.is_cuda else "reference"
    if backend == "reference":
        gather_host_blocks_ref(*pools, src_slabs, dst_slabs)
        return
    if not k_dst.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 before importing triton")
    moves = src_slabs.shape[0]
    if moves == 0:
        return
    block = min(TILE_ELEMENTS, triton.next_power_of_2(width))
    _gather_kernel[(moves, triton.cdiv(width, block))](
        k_src, v_src, k_dst, v_dst, src_slabs, dst_slabs,
        k_src.stride(0), v_src.stride(0), k_dst.stride(0), v_dst.stride(0), width, BLOCK=block, num_warps=4)
