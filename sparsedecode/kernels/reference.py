"""Plain PyTorch references of the decode-attention ops. They define what the Triton kernels compute,
and they are the CPU path of the engine.

The KV cache is either static, one layer's keys `[B, Hkv, T, D]`, or paged: a pool `[NB, Hkv, P, D]` of
physical blocks of P tokens with per-sequence block tables `[B, MB]` int32, token t of sequence b at
`pool[block_tables[b, t // P], :, t % P]` (logical capacity T = MB * P). Every op takes units, pages
and lengths in logical (per-sequence) positions; only the reads of K/V and of per-block metadata go
through the block table. A static cache is the paged one with P = T and block table arange(B)[:, None].
Entries past a sequence's last block are never read by the kernels, but must be block ids all the same
(0, say): the references gather whole tables.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def gather_blocks(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """The logical layout `[B, Hkv, MB * X, D]` of a pool `[NB, Hkv, X, D]` of per-block rows (tokens,
    or pages of bounds) read through `block_tables` [B, MB]: a copy."""
    blocks = pool[block_tables.long()]  # [B, MB, Hkv, X, D]
    return blocks.transpose(1, 2).flatten(2, 3)


def check_scored_rows(scored_rows: torch.Tensor, batch: int, num_kv_heads: int) -> None:
    """The `scored_rows` argument of the decode op: a [B, Hkv] bool (or integer) mask."""
    if scored_rows.shape != (batch, num_kv_heads) or scored_rows.is_floating_point():
        raise ValueError(f"scored_rows must be [{batch}, {num_kv_heads}] bool, not {tuple(scored_rows.shape)}")


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
    *,
    block_tables: torch.Tensor | None = None,
    scored_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one new query per sequence over a (block-)sparse set of cached tokens.

    q: [B, Hq, D]; k, v: [B, Hkv, T, D]; seq_lens: [B] int32. With `block_tables` [B, MB] int32, k and
    v are pools [NB, Hkv, P, D] and T = MB * P (see the module docstring); unit_size need not relate to P.
    unit_lists: [B, Hkv, K] int32 unit (block of `unit_size` tokens) indices, unit_counts: [B, Hkv];
    full_rows: [B, Hkv] bool, rows that ignore their list and attend to everything (None with a list:
    no full rows; no list at all: dense attention).
    unit_lse: optional out [B, Hq, T // unit_size] float32, filled with the log-sum-exp of the scaled
    scores of each visited unit (-inf for units not visited): the block scores of the pass.
    scored_rows: optional [B, Hkv] bool, the rows whose units go to unit_lse (None: every row); the query
    heads of the other rows get -inf throughout.
    Returns out [B, Hq, D] in q's dtype and lse [B, Hq] float32.
    """
    if block_tables is not None:
        # Only the pages up to the longest sequence: the rest is never visited, and gathering every row's
        # whole table would cost the model's maximum context per step. One host read.
        page = k.shape[2]
        pages = min(block_tables.shape[1], -(-max(int(seq_lens.max()), 1) // page))
        block_tables = block_tables[:, :pages]
        k, v = gather_blocks(k, block_tables), gather_blocks(v, block_tables)
        if unit_lse is not None:
            unit_lse.fill_(float("-inf"))
            unit_lse = unit_lse[..., : -(-pages * page // unit_size)]
    batch, num_heads, head_dim = q.shape
    num_kv_heads, capacity = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    # The sums run over the gathered tokens whatever the unit size: over a row padded further they can round
    # differently, and a list of every unit would then not give a full row's (or dense's) bits. Only the
    # mask and the per-unit scores are padded to whole units.
    padded = -(-capacity // unit_size) * unit_size
    mask = visible_tokens(seq_lens, padded, unit_size, unit_lists, unit_counts, full_rows, num_kv_heads)
    mask = mask[..., :capacity]
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * scale
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, v.float())
    if unit_lse is not None:
        per_unit = F.pad(scores, (0, padded - capacity), value=float("-inf"))
        per_unit = per_unit.view(batch, num_kv_heads, group, padded // unit_size, unit_size)
        per_unit = torch.logsumexp(per_unit, dim=-1)
        if scored_rows is not None:
            check_scored_rows(scored_rows, batch, num_kv_heads)
            per_unit = per_unit.masked_fill(~scored_rows.bool()[:, :, None, None], float("-inf"))
        unit_lse.copy_(per_unit.view(batch, num_heads, -1))
    return out.view(batch, num_heads, head_dim).to(q.dtype), lse.view(batch, num_heads)


def quest_page_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    k_min: torch.Tensor,
    k_max: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    aggregate: str,
    *,
    block_tables: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quest's page scores, after folding each row's newest key into its page's bounds.

    q [B, Hq, D]; k [B, Hkv, T, D] one layer's key cache; k_min / k_max [B, Hkv, NP, D] the per-page
    element-wise bounds of the keys (cache dtype), updated in place: the key at position seq_len - 1
    replaces the bounds of its page when it starts the page, else they take its min / max (rows with
    seq_len 0 are left alone). Returns [B, Hkv, NP] float32: per query head the upper bound of q . k
    over the page, sum over d of max(q_d * min_d, q_d * max_d) = relu(q) . max + min(q, 0) . min, from
    products of the cache-dtype values summed in float32, then the max or the sum over the G query heads
    of the KV head.

    With `block_tables` [B, MB] int32, k is a pool [NB, Hkv, P, D] and the bounds are kept per physical
    block, k_min / k_max [NB, Hkv, P // page_size, D]: logical page p of sequence b is page p % (P //
    page_size) of block block_tables[b, p // (P // page_size)]. The fold writes the bounds of the block
    holding position seq_len - 1, which must be the row's own (no other entry of any block table names
    it: a block being appended to is never shared). Returns [B, Hkv, MB * P // page_size], over the
    logical pages."""
    batch, heads, dim = q.shape
    kv_heads = k.shape[1]
    if block_tables is None:  # a static cache: one block of T tokens per sequence
        block_tables = torch.arange(batch, device=q.device)[:, None]
    block = k.shape[2]
    # Only rows holding a key fold it: an empty row's table may name a block that another row writes.
    writers = torch.nonzero(seq_lens > 0).squeeze(1)
    at = seq_lens[writers].long() - 1
    phys = block_tables.long()[writers, at // block]
    page = at % block // page_size
    starts = (at % page_size == 0)[:, None, None]
    new_key = k[phys, :, at % block]  # [writers, Hkv, D]
    k_min[phys, :, page] = torch.where(starts, new_key, torch.minimum(k_min[phys, :, page], new_key))
    k_max[phys, :, page] = torch.where(starts, new_key, torch.maximum(k_max[phys, :, page], new_key))
    page_min, page_max = gather_blocks(k_min, block_tables), gather_blocks(k_max, block_tables)
    qg = q.to(k.dtype).float().view(batch, kv_heads, heads // kv_heads, dim)
    scores = (qg.clamp(min=0) @ page_max.float().transpose(-1, -2)
              + qg.clamp(max=0) @ page_min.float().transpose(-1, -2))
    if aggregate == "max":
        return scores.amax(dim=2)
    if aggregate == "sum":
        return scores.sum(dim=2)
    raise ValueError(f"page score aggregation must be 'max' or 'sum', not {aggregate!r}")


def store_kv_ref(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    layer: int | torch.Tensor,
    block_ids: torch.Tensor,
    offsets: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Write the keys and values of n tokens into a paged KV pool of all layers.

    k_pool, v_pool [L, NB, Hkv, P, D]; layer an int or a 1-element integer tensor; block_ids, offsets [n]
    integers; k, v [n, Hkv, D] in the pool's dtype. Token i goes to pool[layer, block_ids[i], :,
    offsets[i]]; two tokens at the same place leave either one."""
    k_pool[layer, block_ids, :, offsets] = k
    v_pool[layer, block_ids, :, offsets] = v


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: list[int],
    context_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Attention of prompt chunks over their sequences' paged keys, causal and bottom-right aligned.

    q [n, Hq, D]: the chunks of R requests back to back, request r's at rows query_starts[r] ..
    query_starts[r + 1]; one layer's pools [NB, Hkv, P, D] hold every request's keys up to context_lens[r]
    (the chunk's own included), read through block_tables [R, MB]. Query i of request r sits at position
    context_lens[r] - (query_starts[r + 1] - query_starts[r]) + i and attends to the keys at positions up
    to its own; query head h reads KV head h // (Hq // Hkv). Returns [n, Hq, D] in q's dtype."""
    outs = []
    for r, length in enumerate(context_lens):
        rows = q[query_starts[r]:query_starts[r + 1]].transpose(0, 1)  # [Hq, m, D]
        keys = gather_blocks(k_pool, block_tables[r:r + 1])[0, :, :length]
        values = gather_blocks(v_pool, block_tables[r:r + 1])[0, :, :length]
        mask = torch.ones(rows.shape[1], length, dtype=torch.bool, device=q.device).tril(length - rows.shape[1])
        out = F.scaled_dot_product_attention(rows.float()[None], keys.float()[None], values.float()[None],
                                             attn_mask=mask, scale=scale, enable_gqa=True)[0]
        outs.append(out.transpose(0, 1).to(q.dtype))
    return torch.cat(outs)


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer: x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N], in float32 then x's dtype."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def add_rmsnorm_gemv_ref(x: torch.Tensor, residuals: tuple[torch.Tensor, ...], norm_weight: torch.Tensor, eps: float,
                         weight: torch.Tensor, bias: torch.Tensor | None = None,
                         rope: tuple[torch.Tensor, torch.Tensor, int] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): the residual stream s = x + sum(residuals) (summed in float32, stored in x's dtype) and the linear
    layer of its RMSNorm, y = gemv_ref(s / rms(s) * norm_weight, weight, bias) in float32 then x's dtype; with
    `rope` = (cos, sin [M, head_dim], columns), y's first `columns` (heads of head_dim) rotated in float32
    (y * cos + rotate_half(y) * sin) before the rounding."""
    total = x.float()
    for r in residuals:  # in order, as the kernel adds them
        total = total + r.float()
    total = total.to(x.dtype)
    normed = total.float() * torch.rsqrt(total.float().pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    y = normed @ weight.float().T
    y = y if bias is None else y + bias.float()
    if rope is not None:
        cos, sin, columns = rope
        heads = y[:, :columns].view(len(y), -1, cos.shape[-1])
        lo, hi = heads.chunk(2, dim=-1)
        rotated = heads * cos.float()[:, None] + torch.cat((-hi, lo), dim=-1) * sin.float()[:, None]
        y = torch.cat((rotated.flatten(1), y[:, columns:]), dim=1)
    return total, y.to(x.dtype)


def silu_mul_gemv_ref(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The linear layer of silu(gate) * up for gate_up = [gate | up] [M, 2K], weight [N, K]: in float32, then
    gate_up's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return gemv_ref(F.silu(gate) * up, weight.float(),
                    None if bias is None else bias.float()).to(gate_up.dtype)
