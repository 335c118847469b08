"""The attention function `sparse_decoding` switches a model to, registered with transformers' public
`AttentionInterface` (and, for the masks, `AttentionMaskInterface`) under `ATTN_IMPLEMENTATION`.

A decode step of a forward pass that carries a `SparseCache` (the model's forward pre-hook passes it down
under `CACHE_KWARG`) goes through the cache's decode method; everything else, the prefill included, is
transformers' own SDPA attention over the keys and values the model hands in, with SDPA's masks.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from .cache import SparseCache

ATTN_IMPLEMENTATION = "sparsedecode"
#: the keyword under which a forward pass hands its SparseCache down to the attention function
CACHE_KWARG = "sparsedecode_cache"

_SDPA = AttentionInterface()["sdpa"]


def sparse_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [B, Hq, q_len, D]; returns the output [B, q_len, Hq, D] and no attention weights."""
    cache: SparseCache | None = kwargs.pop(CACHE_KWARG, None)
    if cache is None or not cache.decoding:
        return _SDPA(module, query, key, value, attention_mask, **kwargs)
    # One query per sequence; its key and value are in the pool already (`SparseCache.update`).
    return cache.attend(module.layer_idx, query[:, :, 0].contiguous()).unsqueeze(1), None


AttentionInterface.register(ATTN_IMPLEMENTATION, sparse_decode_attention)
# The prefill's SDPA needs SDPA's masks (padding included); an unregistered name would get no mask at all.
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, AttentionMaskInterface()["sdpa"])
