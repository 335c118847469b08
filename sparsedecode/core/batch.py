"""What one decode step tells the attention methods about its sequences."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeBatch:
    """Fixed-address device tensors of one decode step (views of the model runner's buffers, so a CUDA
    graph captured over them replays with new contents).

    Row b is decode slot b. A row without a sequence this step has its block table pointing at the
    pool's null block and reads nothing that matters; its results are discarded.
    """

    block_tables: torch.Tensor  # [B, max_blocks] int32 physical block of each logical block
    seq_lens: torch.Tensor  # [B] int32 tokens per sequence, the new one included
    steps: torch.Tensor  # [B] int32 decode steps the sequence took before this one (0: its first)

    @property
    def size(self) -> int:
        return self.seq_lens.shape[0]
