"""Writing new tokens' keys and values into the paged KV pool: one Triton launch for both.

Computes `reference.store_kv_ref` (read its docstring for the op). Grid (tokens, tiles of the token's
Hkv * D elements): a program copies one tile of the token's key and the same tile of its value, so the
K and V writes of a step cost one launch instead of the two scatters of the reference. The layer can
be a 1-element device tensor, read by the kernel: nothing syncs with the host, and one captured CUDA
graph serves every layer by rewriting that tensor.
"""
from __future__ import annotations

import os
from typing import Literal

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, wait_then_launch_dependents
from .reference import store_kv_ref

#: elements of one token's Hkv * D that a program copies (of K and of V)
TILE_ELEMENTS = 2048


@triton.jit
def _store_kv_kernel(k_pool, v_pool, layer, block_ids, offsets, k, v,
                     s_pl, s_pb, s_ph, s_pt, s_kn, s_kh, s_vn, s_vh, HD,
                     D: tl.constexpr, BLOCK: tl.constexpr, LAYER_IN_MEMORY: tl.constexpr, PDL: tl.constexpr):
    wait_then_launch_dependents(PDL)
    i = tl.program_id(0)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = e < HD
    h = e // D
    d = e % D
    if LAYER_IN_MEMORY:  # else the pools are already the layer's
        # int64: a pool of all layers passes 2**31 elements
        layer_start = tl.load(layer).to(tl.int64) * s_pl
        k_pool += layer_start
        v_pool += layer_start
    place = tl.load(block_ids + i).to(tl.int64) * s_pb + tl.load(offsets + i).to(tl.int64) * s_pt
    dst = place + h * s_ph + d
    src_k = i.to(tl.int64) * s_kn + h * s_kh + d
    src_v = i.to(tl.int64) * s_vn + h * s_vh + d
    tl.store(k_pool + dst, tl.load(k + src_k, mask=ok), mask=ok)
    tl.store(v_pool + dst, tl.load(v + src_v, mask=ok), mask=ok)


def store_kv(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    layer: int | torch.Tensor,
    block_ids: torch.Tensor,
    offsets: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: Literal["auto", "triton", "reference"] = "auto",
) -> None:
    """Write token i's k[i], v[i] at pool[layer, block_ids[i], :, offsets[i]]; the op of
    `reference.store_kv_ref`.

    backend "auto" runs one Triton launch on CUDA tensors (no host synchronisation, also with a tensor
    `layer`: graph-capturable) and the reference on CPU ones; "triton" on CPU tensors needs
    TRITON_INTERPRET=1 (the tests)."""
    _, _, kv_heads, _, dim = k_pool.shape
    tokens = block_ids.shape[0]
    if (v_pool.shape != k_pool.shape or k.shape != (tokens, kv_heads, dim) or v.shape != k.shape
            or offsets.shape != block_ids.shape or block_ids.dim() != 1):
        raise ValueError(f"bad shapes k_pool {tuple(k_pool.shape)} v_pool {tuple(v_pool.shape)} k {tuple(k.shape)} "
                         f"v {tuple(v.shape)} block_ids {tuple(block_ids.shape)} offsets {tuple(offsets.shape)}")
    if not k.dtype == v.dtype == k_pool.dtype == v_pool.dtype:
        raise ValueError("k, v and the pools must share a dtype")
    if isinstance(layer, torch.Tensor) and (layer.numel() != 1 or layer.is_floating_point()):
        raise ValueError(f"layer must be an int or a 1-element integer tensor, not {tuple(layer.shape)} {layer.dtype}")
    if backend == "auto":
        backend = "triton" if k.is_cuda else "reference"
    if backend == "reference":
        store_kv_ref(k_pool, v_pool, layer, block_ids, offsets, k, v)
        return
    if not k.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 before importing triton")
    if k_pool.stride() != v_pool.stride() or k_pool.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the pools need equal strides; pools, k and v a contiguous last dimension")
    if tokens == 0:
        return
    elements = kv_heads * dim
    block = min(TILE_ELEMENTS, triton.next_power_of_2(elements))
    in_memory = isinstance(layer, torch.Tensor)
    s_pl, s_pb, s_ph, s_pt, _ = k_pool.stride()
    if not in_memory:
        k_pool, v_pool, layer = k_pool[layer], v_pool[layer], None
    _store_kv_kernel[(tokens, triton.cdiv(elements, block))](
        k_pool, v_pool, layer, block_ids, offsets, k, v,
        s_pl, s_pb, s_ph, s_pt, k.stride(0), k.stride(1), v.stride(0), v.stride(1), elements,
        D=dim, BLOCK=block, LAYER_IN_MEMORY=in_memory, num_warps=4, **pdl_launch(k.device))
