"""Plain PyTorch references of the decode-attention ops. They define what the Triton kernels compute,
and they are the CPU path of the engine.
"""
from __future__ import annotations

import torch


def visible_tokens(
    seq_lens: torch.Tensor,
    capacity: int,
    unit_size: int,
    unit_lists: torch.Tensor | None,
    unit_counts: torch.Tensor | None,
    full_rows: torch.Tensor | None,
    num_kv_heads: int,
) -> torch.Tensor:
    """[batch, kv_heads, capacity] bool: the tokens each (sequence, KV head) row attends to.

    A full row sees every token below its sequence length; a list row sees the tokens of the first
    `unit_counts` units of its `unit_lists` entry (also below the sequence length). Unit indices out of
    range are ignored.
    """
    batch = seq_lens.shape[0]
    device = seq_lens.device
    in_sequence = torch.arange(capacity, device=device)[None, :] < seq_lens[:, None].long()
    in_sequence = in_sequence[:, None, :].expand(batch, num_kv_heads, capacity)
    if unit_lists is None:
        return in_sequence
    num_units = capacity // unit_size
    slots = torch.arange(unit_lists.shape[-1], device=device)
    listed = slots[None, None, :] < unit_counts[..., None]
    units = unit_lists.long()
    listed = listed & (units >= 0) & (units < num_units)
    selected = torch.zeros(batch, num_kv_heads, num_units + 1, dtype=torch.bool, device=device)
    selected.scatter_(2, torch.where(listed, units, num_units), True)
    selected = selected[..., :num_units].repeat_interleave(unit_size, dim=-1)
    if full_rows is not None:
        selected = selected | full_rows[..., None]
    return selected & in_sequence


def sparse_decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    unit_size: int = 64,
    unit_lists: torch.Tensor | None = None,
    unit_counts: torch.Tensor | None = None,
    full_rows: torch.Tensor | None = None,
    unit_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one new query per sequence over a (block-)sparse set of cached tokens.

    q: [B, Hq, D]; k, v: [B, Hkv, T, D]; seq_lens: [B] int32.
    unit_lists: [B, Hkv, K] int32 unit (block of `unit_size` tokens) indices, unit_counts: [B, Hkv];
    full_rows: [B, Hkv] bool, rows that ignore their list and attend to everything (None with a list:
    no full rows; no list at all: dense attention).
    unit_lse: optional out [B, Hq, T // unit_size] float32, filled with the log-sum-exp of the scaled
    scores of each visited unit (-inf for units not visited): the block scores of the pass.
    Returns out [B, Hq, D] in q's dtype and lse [B, Hq] float32.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, capacity = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    mask = visible_tokens(seq_lens, capacity, unit_size, unit_lists, unit_counts, full_rows, num_kv_heads)
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * scale
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, v.float())
    if unit_lse is not None:
        per_unit = scores.view(batch, num_kv_heads, group, capacity // unit_size, unit_size)
        unit_lse.copy_(torch.logsumexp(per_unit, dim=-1).view(batch, num_heads, -1))
    return out.view(batch, num_heads, head_dim).to(q.dtype), lse.view(batch, num_heads)


def quest_page_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    k_min: torch.Tensor,
    k_max: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    aggregate: str,
) -> torch.Tensor:
    """Quest's page scores, after folding each row's newest key into its page's bounds.

    q [B, Hq, D]; k [B, Hkv, T, D] one layer's key cache; k_min / k_max [B, Hkv, NP, D] the per-page
    element-wise bounds of the keys (cache dtype), updated in place: the key at position seq_len - 1
    replaces the bounds of its page when it starts the page, else they take its min / max (rows with
    seq_len 0 are left alone). Returns [B, Hkv, NP] float32: per query head the upper bound of q . k
    over the page, sum over d of max(q_d * min_d, q_d * max_d) = relu(q) . max + min(q, 0) . min, from
    products of the cache-dtype values summed in float32, then the max or the sum over the G query heads
    of the KV head."""
    batch, heads, dim = q.shape
    kv_heads = k.shape[1]
    rows = torch.arange(batch, device=q.device)
    pos = seq_lens.long() - 1
    at = pos.clamp(min=0)
    page = at // page_size
    writes = (pos >= 0)[:, None, None]
    starts = writes & (at % page_size == 0)[:, None, None]
    new_key = k[rows, :, at]  # [B, Hkv, D]
    old_min, old_max = k_min[rows, :, page], k_max[rows, :, page]
    k_min[rows, :, page] = torch.where(starts, new_key, torch.where(writes, torch.minimum(old_min, new_key), old_min))
    k_max[rows, :, page] = torch.where(starts, new_key, torch.where(writes, torch.maximum(old_max, new_key), old_max))
    qg = q.to(k.dtype).float().view(batch, kv_heads, heads // kv_heads, dim)
    scores = qg.clamp(min=0) @ k_max.float().transpose(-1, -2) + qg.clamp(max=0) @ k_min.float().transpose(-1, -2)
    if aggregate == "max":
        return scores.amax(dim=2)
    if aggregate == "sum":
        return scores.sum(dim=2)
    raise ValueError(f"page score aggregation must be 'max' or 'sum', not {aggregate!r}")
