"""The interface every decode-attention method implements.

The engine owns the model, the paged KV pool and the decode loop; a method owns only the attention of a
decode step. It plans its per-slot state once (`plan`), resets a slot when a new sequence takes it
(`reset_slot`), and then `attend`s once per layer of every decode step. `begin_step` and `attend` must be
capturable in a CUDA graph: fixed shapes, no host synchronisation. Everything a step decides per sequence
(an exact refresh, a dense correction step) is decided on the device from `DecodeBatch.steps`, so a
sequence decodes the same whether it joined the batch first or last.

State lives per decode slot ([max_seqs, ...] tensors); a step of batch size B uses rows [:B]. On one GPU of a
tensor-parallel model a method attends for that GPU's KV heads only (`use_kv_heads`): no head's selection
needs another GPU's.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..core import DecodeBatch, KVPool
from ..models.config import ModelConfig


class DecodeMethod:
    name: ClassVar[str]
    #: options this method accepts as keyword arguments of `LLM(...)`, with their defaults
    defaults: ClassVar[dict[str, Any]] = {}
    #: whether the method reaches K/V only through the pool's attention / index / prefetch, so that a pool in
    #: host memory can serve it
    supports_kv_offload: ClassVar[bool] = False
    #: how many of the prompt's last queries `after_prefill` receives (per layer), for methods that choose
    #: what to keep from how the prompt's end attends (SnapKV-like); 0: none
    prompt_queries: ClassVar[int] = 0

    def __init__(self, config: ModelConfig, **options: Any) -> None:
        self.check_options(options)
        self.config = config
        self.options = {**self.defaults, **options}
        self.scale = config.head_dim**-0.5
        self.kv_heads = range(config.num_kv_heads)  # the model's KV heads this instance attends for

    def use_kv_heads(self, heads: range) -> None:
        """Attend for the model's KV heads `heads` only: one GPU's of a tensor-parallel model, whose pool holds
        just those. Call before `plan`: per-head state follows the pool, per-head options (lychee's roles) are
        sliced to `heads`. The KV accounting (`kv_tokens_read`) stays the whole model's."""
        self.kv_heads = heads

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Refuse options the method does not accept (before any model is loaded)."""
        unknown = sorted(set(options) - set(cls.defaults))
        if unknown:
            raise TypeError(f"method {cls.name!r} got unknown option(s) {unknown}; it accepts: "
                            f"{sorted(cls.defaults) or 'no options'}")

    def plan(self, pool: KVPool, max_seqs: int, max_blocks: int) -> None:
        """Allocate per-slot state for `max_seqs` sequences of up to `max_blocks` pool blocks each."""

    def block_state_bytes(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of state the method keeps per pool block (all layers), besides its K/V."""
        return 0

    def reset_slot(self, slot: int) -> None:
        """A new sequence takes decode slot `slot`: forget its previous occupant (host call, before its first
        decode step)."""

    def after_prefill(self, layer: int, pool: KVPool, blocks: torch.Tensor, length: int,
                      queries: torch.Tensor | None = None) -> None:
        """Called per layer once a sequence's prompt is in the pool: its block table `blocks` (int64) holds
        `length` tokens. With `prompt_queries` > 0, `queries` [n, Hq, D] are the layer's queries of the
        last n prefilled tokens (rotated, as attention saw them)."""

    def begin_step(self, batch: DecodeBatch) -> None:
        """Per-step work before layer 0 (inside the captured step)."""

    def attend(self, layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch) -> torch.Tensor:
        """Decode attention of one layer. q: [B, Hq, D], the new token's K/V already in the pool."""
        raise NotImplementedError(f"method {self.name!r} defines no attend()")

    def kv_tokens_read(self, seq_len: int, step: int) -> float:
        """Token rows (K and V of one KV head of one layer) that decode step `step` (0-based) of a sequence
        of `seq_len` tokens reads, summed over layers and KV heads; the count behind `kv_bytes_per_token`.
        Every method must define it: a method that forgot would otherwise report dense reads."""
        raise NotImplementedError(f"method {self.name!r} defines no kv_tokens_read()")

    def dense_tokens_read(self, seq_len: int) -> float:
        return float(self.config.num_layers * self.config.num_kv_heads * seq_len)

    def extra_kv_tokens_read(self, slot: int, mean_seq_len: float) -> float:
        """Token rows the sequence in `slot` read since its `reset_slot` beyond `kv_tokens_read`: reads
        decided on the device inside the captured step (LFPS threshold refreshes), priced at the
        sequence's mean length. One host sync; called once per finished sequence."""
        return 0.0
