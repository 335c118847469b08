"""Rank 0's runner of a model split over GPUs: the engine's runner calls, each sent to the workers as a plan
before it runs here.

The scheduler and the block manager run on rank 0 only; every GPU holds the same pool blocks (the block
tables are the scheduler's) for its own KV heads. Every GPU holds the whole logits after the output head's
all-gather and samples the same tokens with the same seeds, so a decode step's sampled tokens, fed back as
the next step's input inside the CUDA graph, agree everywhere, and rank 0's results are the model's.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..core import KVPool
from ..methods.base import DecodeMethod
from ..models.config import ModelConfig
from .model_runner import DecodeRow, ModelRunner, PrefillRequest
from .sampling import TokenLogprob
from .workers import Workers


class TensorParallelRunner:
    """ModelRunner's interface to the engine, over rank 0's runner (`local`) and the workers' runners."""

    def __init__(self, local: ModelRunner, workers: Workers) -> None:
        self.local, self.workers = local, workers
        # what the engine reads: rank 0's (every rank's pool has the same blocks)
        self.config: ModelConfig = local.config
        self.pool: KVPool = local.pool
        self.block_size: int = local.block_size

    # -- what changes with the calls below: read through -----------------------------------------
    @property
    def method(self) -> DecodeMethod:
        """Rank 0's method: its KV accounting is the whole model's."""
        return self.local.method

    @property
    def cuda_graphs(self) -> bool:
        return self.local.cuda_graphs

    # -- what every rank runs ----------------------------------------------------------------------
    def prefill(self, requests: list[PrefillRequest]) -> torch.Tensor:
        self.workers.send("prefill", requests)
        return self.local.prefill(requests)

    def decode(self, rows: list[DecodeRow], num_steps: int
               ) -> tuple[list[list[int]], list[list[TokenLogprob] | None] | None]:
        # the workers get what changed in the tables, not the tables: every rank's copy follows the same changes
        changes = self.local.tables.changes([(r.slot, r.block_table) for r in rows])
        self.workers.send("decode", [replace(r, block_table=[]) for r in rows], num_steps, changes)
        return self.local.decode(rows, num_steps, changes)

    def start_decoding(self, slot: int, block_table: list[int], length: int) -> None:
        self.workers.send("start_decoding", slot, block_table, length)
        self.local.start_decoding(slot, block_table, length)

    def use_method(self, method: DecodeMethod) -> None:
        self.workers.send("use_method", type(method), method.options)
        self.local.use_method(method)

    def set_cuda_graphs(self, value: bool) -> None:
        self.workers.send("set_cuda_graphs", value)
        self.local.set_cuda_graphs(value)

    def capture_decode_steps(self) -> list[tuple[int, float]]:
        self.workers.send("capture_decode_steps")
        return self.local.capture_decode_steps()

    def extra_kv_tokens_read(self, slot: int, mean_seq_len: float) -> float:
        """The sum over the GPUs: each counts the reads of its own KV heads."""
        self.workers.send("extra_kv_tokens_read", slot, mean_seq_len, reply=True)
        return self.local.extra_kv_tokens_read(slot, mean_seq_len) + sum(self.workers.replies())

    # -- rank 0 alone -------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, rows: list[DecodeRow]
               ) -> tuple[list[int], list[TokenLogprob | None] | None]:
        """The first token after a prefill: the workers receive it as the input of the next decode plan."""
        return self.local.sample(logits, rows)
