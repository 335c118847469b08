"""The preallocated KV cache: one contiguous token axis per (layer, sequence, KV head).

Layout `[layers, batch, kv_heads, capacity, head_dim]`: a block of `block_size` tokens of one head is
one contiguous `block_size * head_dim` slab, so block-sparse kernels read whole blocks with unit-stride
loads and a selection is a list of block indices per (sequence, KV head).
"""
from __future__ import annotations

import torch


def store_token(k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int | torch.Tensor, positions: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> None:
    """Write one decoded token per sequence (k, v: [batch, kv_heads, head_dim]) at `positions` of layer
    `layer` of the [layers, batch, kv_heads, capacity, head_dim] tensors."""
    rows = torch.arange(positions.shape[0], device=positions.device)
    k_cache[layer, rows, :, positions] = k
    v_cache[layer, rows, :, positions] = v


class KVCache:
    #: K/V are device tensors the decode step may write the new token into itself (inside its compiled
    #: graph); a cache keeping them elsewhere stores the token through `append`
    writable_on_device = True

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if capacity % block_size:
            raise ValueError(f"capacity {capacity} is not a multiple of block_size {block_size}")
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.k = self.storage("k", shape, dtype, device)
        self.v = self.storage("v", shape, dtype, device)
        self.block_size = block_size
        # Tokens held per sequence; the engine updates it on the host after prefill and per step.
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)

    def storage(self, part: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
                ) -> torch.Tensor:
        """Where K (`part` "k") or V ("v") lives (a subclass may keep them elsewhere)."""
        return torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def num_blocks(self) -> int:
        return self.capacity // self.block_size

    @property
    def device(self) -> torch.device:
        return self.k.device

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def write(self, layer: int, batch_index: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store prefill keys/values k, v: [kv_heads, n, head_dim] at positions start .. start + n."""
        end = start + k.shape[1]
        self.k[layer, batch_index, :, start:end] = k
        self.v[layer, batch_index, :, start:end] = v

    def prefix(self, layer: int, batch_index: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of positions 0 .. end of one sequence: [kv_heads, end, head_dim] each."""
        return self.k[layer, batch_index, :, :end], self.v[layer, batch_index, :, :end]

    def append(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one decoded token per sequence (k, v: [batch, kv_heads, head_dim]) at `positions`."""
        store_token(self.k, self.v, layer, positions, k, v)

    @staticmethod
    def capacity_for(tokens: int, block_size: int) -> int:
        return -(-tokens // block_size) * block_size
