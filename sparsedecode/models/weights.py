"""The one table between our parameter names and transformers' (Llama, Qwen2, Qwen3, Mistral).

Our decoder fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`: such a parameter is the
concatenation, along dim 0 and in the table's order, of the transformers parameters it names. `split` says
how tensor parallelism cuts a weight over GPUs (`parallel.shard_weight`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .config import ModelConfig


class Weight(NamedTuple):
    ours: str
    theirs: tuple[str, ...]  # concatenated along dim 0, in this order
    needs: str | None = None  # the ModelConfig flag without which the weight does not exist
    rows: Callable[[ModelConfig], list[int]] | None = None  # fused: the rows of each of `theirs`
    # Over GPUs: "rows" (each fused part by rows: attention by heads, the MLP by intermediate columns),
    # "columns" (the projections back to the residual stream), "vocab" (vocabulary rows), "first" (a bias
    # added after a partial sum: GPU 0 holds it), None (every GPU holds it whole).
    split: str | None = None


def _qkv_rows(c: ModelConfig) -> list[int]:
    return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]


def _gate_up_rows(c: ModelConfig) -> list[int]:
    return [c.intermediate_size, c.intermediate_size]


#: the weights outside the layers
MODEL_WEIGHTS = (
    Weight("embed_tokens.weight", ("model.embed_tokens.weight",), split="vocab"),
    Weight("norm.weight", ("model.norm.weight",)),
    Weight("lm_head.weight", ("lm_head.weight",), split="vocab"),
)
#: the weights of layer i, below `layers.{i}.` (ours) and `model.layers.{i}.` (theirs)
LAYER_WEIGHTS = (
    Weight("qkv_proj.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
           rows=_qkv_rows, split="rows"),
    Weight("qkv_proj.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv_bias",
           _qkv_rows, "rows"),
    Weight("o_proj.weight", ("self_attn.o_proj.weight",), split="columns"),
    Weight("o_proj.bias", ("self_attn.o_proj.bias",), "o_bias", split="first"),
    Weight("gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), rows=_gate_up_rows, split="rows"),
    Weight("down_proj.weight", ("mlp.down_proj.weight",), split="columns"),
    Weight("input_layernorm.weight", ("input_layernorm.weight",)),
    Weight("post_attention_layernorm.weight", ("post_attention_layernorm.weight",)),
    Weight("q_norm.weight", ("self_attn.q_norm.weight",), "qk_norm"),
    Weight("k_norm.weight", ("self_attn.k_norm.weight",), "qk_norm"),
)
#: a checkpoint of tied embeddings may leave out the output head: it is the input embedding
FALLBACKS = {"lm_head.weight": "model.embed_tokens.weight"}


def weight_names(config: ModelConfig) -> list[tuple[str, Weight]]:
    """(our full name, its table row with transformers' full names) of every weight of the model that
    `config` describes."""
    names = [(w.ours, w) for w in MODEL_WEIGHTS if w.needs is None or getattr(config, w.needs)]
    for i in range(config.num_layers):
        names += [
            (f"layers.{i}.{w.ours}", w._replace(theirs=tuple(f"model.layers.{i}.{name}" for name in w.theirs)))
            for w in LAYER_WEIGHTS
            if w.needs is None or getattr(config, w.needs)
        ]
    return names


def from_transformers(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from transformers' parameters (a fused parameter is a new tensor)."""
    def get(name: str) -> torch.Tensor:
        return state[FALLBACKS[name]] if name in FALLBACKS and name not in state else state[name]

    return {
        ours: torch.cat([get(name) for name in w.theirs], dim=0) if w.rows else get(w.theirs[0])
        for ours, w in weight_names(config)
    }


def to_transformers(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' parameters from our state dict; a fused parameter is split into views (no copies)."""
    theirs: dict[str, torch.Tensor] = {}
    for ours, w in weight_names(config):
        if w.rows:
            theirs.update(zip(w.theirs, state[ours].split(w.rows(config)), strict=True))
        else:
            theirs[w.theirs[0]] = state[ours]
    return theirs
