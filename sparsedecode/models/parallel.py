"""Tensor parallelism of the decoder: which slice of every weight one GPU holds, and the collectives that join
the slices.

Attention is split by KV head: a GPU holds whole GQA groups (its KV heads and their query heads), so their
K/V, their cache blocks and any block selection made from them never leave it. The MLP is split by its
intermediate columns (gate and up by rows, down by columns). Each half ends in a partial sum of the residual
update: one all-reduce after attention's output projection, one after the MLP. The embedding and the output
head are split by vocabulary rows: the embedding is an all-reduce of each GPU's rows (zero for ids outside
them), the logits an all-gather, so every GPU holds the whole logits and samples the same token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .weights import Weight

# torch >= 2.12 names it all_gather_single; earlier releases all_gather_into_tensor (the same collective)
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TensorParallel:
    """This GPU's place among the `world_size` GPUs of one model; the default is one GPU holding everything.
    The collectives run on torch.distributed's default process group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # where the collectives' own tensors live (NCCL: the GPU)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def part(self, total: int) -> range:
        """This GPU's equal share of `total` items (heads, rows, columns); `total` divides by world_size."""
        size = total // self.world_size
        return range(self.rank * size, (self.rank + 1) * size)

    def vocab_rows(self, vocab_size: int) -> int:
        """Rows of the embedding and output head per GPU: the vocabulary padded to a multiple of world_size."""
        return -(-vocab_size // self.world_size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the GPUs, in place (x itself on one GPU)."""
        if self.sharded:
            dist.all_reduce(x)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[n, c] on each GPU -> [n, world_size * c], GPU 0's columns first."""
        if not self.sharded:
            return x
        n, columns = x.shape
        out = x.new_empty(self.world_size * n, columns)
        _gather_into(out, x.contiguous())
        return out.view(self.world_size, n, columns).transpose(0, 1).reshape(n, self.world_size * columns)

    def min(self, value: int) -> int:
        """The smallest of every GPU's `value` (one host round trip)."""
        if not self.sharded:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def tensor_parallel_sizes(config: ModelConfig) -> list[int]:
    """The GPU counts a model splits over: those dividing its KV heads and its MLP's intermediate size."""
    return [n for n in range(1, config.num_kv_heads + 1)
            if config.num_kv_heads % n == 0 and config.intermediate_size % n == 0]


def check_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """ValueError unless `world_size` GPUs can each hold whole KV heads and an equal share of the MLP."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be a number of GPUs, at least 1, not {world_size}")
    if world_size not in tensor_parallel_sizes(config):
        raise ValueError(
            f"tensor_parallel_size={world_size} does not divide this model's num_kv_heads={config.num_kv_heads} "
            f"(intermediate_size={config.intermediate_size}): each GPU holds whole KV heads with their query "
            f"heads and an equal share of the MLP; sizes that work: "
            f"{', '.join(map(str, tensor_parallel_sizes(config)))}")


class VocabParallelEmbedding(nn.Module):
    """This GPU's rows of the token embedding; the all-reduce adds the other GPUs' rows."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        rows = tp.vocab_rows(vocab_size)
        self.tp, self.first = tp, tp.rank * rows
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        local = token_ids - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())


def shard_weight(weight: Weight, tensor: Any, config: ModelConfig, tp: TensorParallel) -> torch.Tensor:
    """This GPU's slice of one whole weight (`weight.split` says how). `tensor` is a tensor, or a safetensors
    slice: only indexing reaches it, so from a file only the slice is read."""
    if not tp.sharded or weight.split is None:
        return tensor[:]
    if weight.split == "rows":  # each fused part (q, k, v; gate, up) cut in world_size equal row blocks
        parts, start = [], 0
        for size in weight.rows(config):
            mine = tp.part(size)
            parts.append(tensor[start + mine.start : start + mine.stop])
            start += size
        return torch.cat(parts)
    if weight.split == "columns":
        mine = tp.part(_shape(tensor)[1])
        return tensor[:, mine.start : mine.stop]
    if weight.split == "vocab":
        vocab, rows = _shape(tensor)[0], tp.vocab_rows(_shape(tensor)[0])
        first = min(tp.rank * rows, vocab)
        mine = tensor[first : min(first + rows, vocab)]
        return F.pad(mine, (0, 0, 0, rows - mine.shape[0]))  # the padding rows' logits are cut after the gather
    if weight.split == "first":  # the bias of a partial sum: added once, by GPU 0
        whole = tensor[:]
        return whole if tp.rank == 0 else torch.zeros_like(whole)
    raise ValueError(f"unknown split {weight.split!r} of {weight.ours}")
