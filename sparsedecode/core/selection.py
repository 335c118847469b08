"""From per-block attention scores to a fixed-shape list of blocks, on the device.

A selection is `(blocks [B, Hkv, K] int32 ascending, counts [B, Hkv] int32)`: the first `counts`
entries are valid. Ascending order matters: a selection of every block reads exactly like a full row,
so a budget that covers the context reproduces dense attention bit for bit.
"""
from __future__ import annotations

import math

import torch

from ..kernels.select_blocks import MAX_BLOCKS, SELECT_MODES, select_blocks

BUDGET_MODES = ("tokens", "ratio", "top_p", "threshold")


def block_scores(unit_lse: torch.Tensor, lse: torch.Tensor, num_kv_heads: int, aggregate: str) -> torch.Tensor:
    """Attention probability mass of each block, aggregated over the query heads of each KV head.
    unit_lse: [B, Hq, NB] float32 log-sum-exp per block; lse: [B, Hq] -> [B, Hkv, NB] float32."""
    probs = torch.exp(unit_lse - lse[..., None]).nan_to_num(0.0)
    batch, heads, blocks = probs.shape
    grouped = probs.view(batch, num_kv_heads, heads // num_kv_heads, blocks)
    if aggregate == "max":
        return grouped.amax(dim=2)
    if aggregate == "sum":
        return grouped.sum(dim=2)
    raise ValueError(f"block score aggregation must be 'max' or 'sum', not {aggregate!r}")


def max_selected_blocks(mode: str, budget: float, capacity: int, block_size: int) -> int:
    """The fixed list length K a budget mode needs for a cache of `capacity` tokens."""
    blocks = capacity // block_size
    if mode == "tokens":
        return max(1, min(blocks, math.ceil(budget / block_size)))
    if mode == "ratio":
        return max(1, min(blocks, math.ceil(budget * blocks) + 2))
    return blocks  # top_p / threshold: bounded only by the context


class BlockSelector:
    """Chooses blocks from scores under a budget mode, always keeping the sink and newest blocks.

    mode "tokens": budget is a token count (a multiple of the block size is used);
    "ratio": budget is the kept fraction of the context's blocks; "top_p": the fewest blocks holding
    `budget` of the attention mass; "threshold": blocks whose mass is at least `budget`.
    `max_tokens` caps the top_p/threshold modes.
    """

    def __init__(self, mode: str, budget: float, block_size: int, sink_blocks: int = 1, local_blocks: int = 1,
                 max_tokens: int | None = None) -> None:
        if mode not in BUDGET_MODES:
            raise ValueError(f"budget mode must be one of {BUDGET_MODES}, not {mode!r}")
        if mode == "tokens" and budget < block_size:
            raise ValueError(f"budget of {budget} tokens is below one block of {block_size}")
        if mode in ("ratio", "top_p") and not 0 < budget <= 1:
            raise ValueError(f"{mode} budget must be in (0, 1], not {budget}")
        self.mode, self.budget, self.block_size = mode, budget, block_size
        self.sink_blocks, self.local_blocks = sink_blocks, local_blocks
        self.max_tokens = max_tokens

    def list_length(self, capacity: int) -> int:
        k = max_selected_blocks(self.mode, self.budget, capacity, self.block_size)
        if self.max_tokens is not None and self.mode in ("top_p", "threshold"):
            k = min(k, max(1, self.max_tokens // self.block_size))
        return k

    def tokens_kept(self, seq_len: int) -> int:
        """Tokens a list row reads at `seq_len` (analytic, for the KV bytes accounting): its blocks, the
        newest of which (always kept when `local_blocks` > 0) holds only the tokens written so far."""
        blocks = -(-seq_len // self.block_size)
        if self.mode == "tokens":
            kept = self.budget // self.block_size
        elif self.mode == "ratio":
            kept = math.ceil(self.budget * blocks)
        else:  # data-dependent: count the cap, an upper bound
            kept = self.list_length(blocks * self.block_size)
        kept = min(int(max(kept, self.sink_blocks + self.local_blocks)), blocks)
        if kept == blocks:
            return seq_len
        partial = blocks * self.block_size - seq_len  # the newest block's unwritten tail
        return kept * self.block_size - (partial if self.local_blocks else 0)

    def uses_kernel(self, device: torch.device, num_blocks: int) -> bool:
        """Whether `select_into` runs the one-launch Triton kernel (CUDA, modes tokens / ratio)."""
        return torch.device(device).type == "cuda" and self.mode in SELECT_MODES and num_blocks <= MAX_BLOCKS

    def select_into(self, blocks: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor,
                    scores: torch.Tensor | None = None, *, unit_lse: torch.Tensor | None = None,
                    lse: torch.Tensor | None = None, aggregate: str = "max", share_heads: bool = False,
                    copy_to: tuple[torch.Tensor, torch.Tensor] | None = None,
                    use_kernel: bool | None = None) -> None:
        """Select for the rows where `rows` [B, Hkv] (bool) is True and write in place into `blocks`
        [B, Hkv, K] int32 and `counts` [B, Hkv] int32; the other rows keep their entries.

        Scores: `scores` [B, Hkv, NB] as `select` takes them, or `unit_lse` [B, Hq, NB] with `lse` [B, Hq]
        (scored as `block_scores(unit_lse, lse, Hkv, aggregate)`). share_heads: every row selects from the
        sum over the KV heads (TidalDecode). `copy_to`: a second (blocks, counts) pair that gets the same
        rows (in the kernel's stores: no extra launch). The result is `select`'s: on CUDA in modes tokens / ratio it is
        one Triton launch (`kernels.select_blocks`), otherwise the PyTorch path; `use_kernel` forces one.
        """
        if scores is None and (unit_lse is None or lse is None):
            raise ValueError("select_into needs scores, or unit_lse and lse")
        source = unit_lse if scores is None else scores
        if use_kernel is None:
            use_kernel = self.uses_kernel(source.device, source.shape[-1])
        if use_kernel:
            select_blocks(source, lse if scores is None else None, seq_lens, rows, blocks, counts,
                          aggregate=aggregate, mode=self.mode, budget=self.budget, block_size=self.block_size,
                          sink_blocks=self.sink_blocks, local_blocks=self.local_blocks, share_heads=share_heads,
                          copy_to=copy_to)
            return
        if scores is None:
            scores = block_scores(unit_lse, lse, blocks.shape[1], aggregate)
        if share_heads:
            scores = scores.sum(dim=1, keepdim=True).expand_as(scores)
        new_blocks, new_counts = self.select(scores, seq_lens, blocks.shape[-1])
        for out_blocks, out_counts in [(blocks, counts)] + ([copy_to] if copy_to is not None else []):
            out_blocks.copy_(torch.where(rows[..., None], new_blocks, out_blocks))
            out_counts.copy_(torch.where(rows, new_counts, out_counts))

    def select(self, scores: torch.Tensor, seq_lens: torch.Tensor, list_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """scores: [B, Hkv, NB] -> (blocks [B, Hkv, K], counts [B, Hkv])."""
        batch, heads, num_blocks = scores.shape
        device = scores.device
        valid = (-(-seq_lens.long() // self.block_size))[:, None, None]  # blocks holding tokens
        index = torch.arange(num_blocks, device=device)[None, None, :]
        forced = (index < self.sink_blocks) | (index >= valid - self.local_blocks)
        ranked = torch.where(forced, torch.full_like(scores, float("inf")), scores)
        ranked = torch.where(index < valid, ranked, torch.full_like(scores, float("-inf")))
        # Stable descending sort: equal scores rank by the lower block index (the kernel's tie rule).
        top_scores, top_blocks = ranked.sort(dim=-1, descending=True, stable=True)
        top_scores, top_blocks = top_scores[..., :list_length], top_blocks[..., :list_length]
        valid_count = valid.view(batch, 1).expand(batch, heads).clamp(max=list_length)
        if self.mode == "tokens":
            counts = torch.full((batch, heads), self.budget // self.block_size, device=device).clamp(min=1)
        elif self.mode == "ratio":
            counts = torch.ceil(self.budget * valid.view(batch, 1).float()).expand(batch, heads)
        elif self.mode == "top_p":
            mass = top_scores.clamp(min=0).nan_to_num(0.0, posinf=0.0)
            total = torch.where(index < valid, scores, torch.zeros_like(scores)).sum(-1, keepdim=True)
            before = mass.cumsum(-1) - mass  # mass of the blocks ranked ahead of each
            counts = (before < self.budget * total).sum(-1)
        else:
            counts = (top_scores >= self.budget).sum(-1)
        n_forced = forced.logical_and(index < valid).sum(-1)
        counts = torch.maximum(counts.long(), n_forced).clamp(max=valid_count).to(torch.int32)
        slots = torch.arange(list_length, device=device)[None, None, :]
        sentinel = torch.full_like(top_blocks, num_blocks)
        ordered = torch.where(slots < counts[..., None], top_blocks, sentinel).sort(dim=-1).values
        return ordered.to(torch.int32), counts
