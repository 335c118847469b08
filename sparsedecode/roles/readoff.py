"""Reading roles off learned gates (or any per-unit scores): the target, as a count or a density, and the
choice of the retrieval units. Layer 0 is always retrieval and is never learned.

With a target count N the N units of largest score are retrieval; with a target density, those whose
score exceeds 0.5. A learned gate's score is its mean E[z] (by quadrature, `StretchedGate.mean`); the
training loop also records how many gate means exceed 0.5 when the target is a count (`units_above_half`).
"""
from __future__ import annotations

from typing import Any

import torch

from ..models.config import ModelConfig
from .head_roles import HeadRoles

OPEN = 0.5  # a gate mean above this reads as an open gate: a retrieval unit when the target is a density


def check_target(config: ModelConfig, target_retrieval: int | None, density: float | None) -> tuple[float, int | None]:
    """(target density, target count or None) from exactly one of them. The density counts learned
    retrieval units over all units (the reference's 24 of 256 for Llama-3-8B); layer 0 comes on top."""
    units = config.num_layers * config.num_kv_heads
    learnable = units - config.num_kv_heads
    if (target_retrieval is None) == (density is None):
        raise ValueError("give exactly one of the target number of retrieval units or the target density")
    if target_retrieval is not None:
        if not 1 <= target_retrieval <= learnable:
            raise ValueError(
                f"target of {target_retrieval} retrieval units is out of range: this model has {learnable} "
                f"units outside layer 0 ({config.num_layers} layers x {config.num_kv_heads} KV heads, layer 0 "
                "always retrieval)"
            )
        return target_retrieval / units, target_retrieval
    if not 0 < density <= learnable / units:
        raise ValueError(f"target density {density} is out of range: it must lie in (0, {learnable / units:.4f}]")
    return density, None


def roles_from_scores(
    scores: torch.Tensor, config: ModelConfig, count: int | None, source: dict[str, Any]
) -> HeadRoles:
    """Roles from per-unit scores of layers 1.. [layers - 1, Hkv]: the `count` best units, or (count None)
    the units whose score (a gate's mean) exceeds OPEN. Layer 0 is always retrieval."""
    mask = torch.zeros(config.num_layers, config.num_kv_heads, dtype=torch.bool)
    if count is None:
        mask[1:] = scores > OPEN
    else:
        mask[1:].view(-1)[scores.flatten().topk(count).indices] = True
    return HeadRoles(mask, config.identity(), source)
