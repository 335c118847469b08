"""The interface every decode-attention method implements, and the registry that names them.

The engine owns the model, the KV cache and the decode loop; a method owns only the attention of a
decode step. Plan once (`plan`), then per step: the engine asks for the step's `variant` on the host
(e.g. "refresh" every R steps), and calls `attend` once per layer. `attend` must be capturable in a
CUDA graph: fixed shapes, no host synchronisation. The engine captures one graph per variant.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..engine.kv_cache import KVCache
from ..models.config import ModelConfig


class DecodeMethod:
    name: ClassVar[str]
    #: options this method accepts as keyword arguments of `LLM(...)`, with their defaults
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: ModelConfig, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"method {self.name!r} got unknown option(s) {unknown}; it accepts: "
                f"{sorted(self.defaults) or 'no options'}"
            )
        self.config = config
        self.options = {**self.defaults, **options}
        self.scale = config.head_dim**-0.5

    def plan(self, cache: KVCache) -> None:
        """Allocate per-batch state for `cache` (fixed shapes, reused across steps)."""

    def after_prefill(self, layer: int, cache: KVCache, batch_index: int, length: int) -> None:
        """Called once per layer after a sequence's prefill has filled its cache rows."""

    def step_variant(self, step: int) -> str:
        """The kind of step `step` (0-based decode step) is; one CUDA graph is captured per kind."""
        return "default"

    def set_variant(self, variant: str) -> None:
        self.variant = variant

    def attend(self, layer: int, q: torch.Tensor, cache: KVCache, seq_lens: torch.Tensor) -> torch.Tensor:
        """Decode attention of one layer. q: [batch, heads, head_dim], the new token's K/V already in
        `cache`; seq_lens: [batch] int32 tokens per sequence including the new one."""
        raise NotImplementedError

    def kv_tokens_read(self, seq_len: int, variant: str) -> float:
        """Token rows (K and V of one KV head of one layer) one step of a sequence reads, summed over
        layers and KV heads; the analytic count behind `kv_bytes_per_token`."""
        return float(self.config.num_layers * self.config.num_kv_heads * seq_len)

    def extra_kv_tokens_read(self, mean_seq_lens: list[float]) -> list[float]:
        """Token rows read since the last prefill beyond the analytic `kv_tokens_read`, per sequence:
        reads decided on the device inside the captured step (LFPS threshold refreshes), priced at each
        sequence's mean length over the decode. One host sync; called once per generation."""
        return [0.0] * len(mean_seq_lens)


METHODS: dict[str, type[DecodeMethod]] = {}


def register(cls: type[DecodeMethod]) -> type[DecodeMethod]:
    METHODS[cls.name] = cls
    return cls


def make_method(name: str, config: ModelConfig, **options: Any) -> DecodeMethod:
    from . import available  # noqa: F401  (imports every method module so each registers itself)

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](config, **options)
