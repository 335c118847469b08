"""LycheeDecode: hybrid retrieval / sparse KV heads.

Per layer, retrieval KV heads attend to the whole cache and, in the same pass, score its blocks; their
top blocks are handed to the same KV-head index of the following layers. Sparse KV heads attend only to
the blocks they were handed. One kernel launch per layer covers both kinds of head; on CUDA the selection
runs on a side stream, overlapping the rest of the layer (`SelectionStream`).
TidalDecode is the layer-level special case (whole layers select, one set shared by all heads).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from ..core import BlockSelector, DecodeBatch, KVPool
from ..roles.head_roles import HeadRoles, resolve_roles
from .base import DecodeMethod

#: roles used when none are given and none are shipped for the model (chosen by measurement, see docs)
DEFAULT_ROLES = "tidal"


class SelectionStream:
    """Runs a layer's block selection on a side CUDA stream, where it overlaps the projections that follow the
    attention instead of delaying them; `join` makes the decode stream wait for it, and must come before
    anything reads what the selection writes or overwrites what it reads (the next layer's attention writes
    the shared block scores). The tensors handed to `run` (the pass's lse, allocated on the decode stream) are
    held until the join, so that the allocator cannot give their memory to later decode work. Fork and join
    follow the decode stream, so a captured step captures both (a capture needs every side stream joined
    before it ends: the caller joins at its last layer). Without CUDA, with a pool that prefetches (host
    memory), or with `enabled` off, `run` calls at once."""

    #: class-wide switch: False runs every selection in line (A/B measurements)
    enabled: ClassVar[bool] = True

    def __init__(self, pool: KVPool) -> None:
        overlap = self.enabled and pool.device.type == "cuda" and not pool.prefetches
        self.stream = torch.cuda.Stream(pool.device) if overlap else None
        self.held: tuple[torch.Tensor, ...] | None = None  # None: nothing pending

    @property
    def overlaps(self) -> bool:
        return self.stream is not None

    def run(self, work: Callable[[], None], *held: torch.Tensor) -> None:
        if self.stream is None:
            work()
            return
        self.join()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            work()
        self.held = held

    def join(self) -> None:
        if self.held is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self.held = None


class Lychee(DecodeMethod):
    name = "lychee"
    defaults = dict(
        roles=None,  # preset name, roles file, HeadRoles, or None for the shipped learned roles
        budget=4096,  # tokens ("tokens" mode), kept fraction ("ratio"), mass ("top_p"), or "threshold"
        budget_mode="tokens",
        block_size=64,
        aggregate="sum",  # block score over the group's query heads: "sum" (measured better) or "max"
        sink_blocks=1,
        local_blocks=1,
        dense_every=0,  # cache correction: a dense step every N tokens (0: never)
        share_heads=False,  # one selection for all KV heads of a layer (TidalDecode)
        max_tokens=None,  # cap of the top_p / threshold modes
    )
    default_roles = DEFAULT_ROLES

    def __init__(self, config, **options) -> None:
        super().__init__(config, **options)
        o = self.options
        if o["block_size"] not in (16, 32, 64, 128):
            raise ValueError(f"block_size must be 16, 32, 64 or 128, not {o['block_size']}")
        self.roles: HeadRoles = resolve_roles(o["roles"], config, self.default_roles)
        self.selector = BlockSelector(
            o["budget_mode"], o["budget"], o["block_size"], o["sink_blocks"], o["local_blocks"], o["max_tokens"]
        )
        if o["aggregate"] not in ("max", "sum"):
            raise ValueError(f"aggregate must be 'max' or 'sum', not {o['aggregate']!r}")
        retrieval = self.roles.retrieval
        # A layer selects only for retrieval heads whose index is sparse in the next layer: a retrieval
        # head there would replace the selection before anyone read it.
        hands_on = retrieval[:-1] & ~retrieval[1:]
        self.selects = [bool(hands_on[l].any()) for l in range(config.num_layers - 1)] + [False]
        self.all_full = [bool(retrieval[l].all()) for l in range(config.num_layers)]

    def plan(self, pool: KVPool, max_seqs: int, max_blocks: int) -> None:
        heads, device = pool.num_kv_heads, pool.device
        capacity = max_blocks * pool.block_size
        self.list_length = self.selector.list_length(capacity)
        self.blocks = torch.zeros(max_seqs, heads, self.list_length, dtype=torch.int32, device=device)
        self.counts = torch.zeros(max_seqs, heads, dtype=torch.int32, device=device)
        num_units = capacity // self.options["block_size"]
        self.unit_lse = torch.empty(max_seqs, heads * self.config.group_size, num_units, dtype=torch.float32,
                                    device=device)
        retrieval = self.roles.retrieval[:, self.kv_heads.start : self.kv_heads.stop]  # this GPU's heads
        self.retrieval_rows = retrieval.to(device)[:, None, :].expand(-1, max_seqs, -1).contiguous()
        self.full_rows = torch.empty_like(self.retrieval_rows)  # this step's: retrieval, or every row of a dense step
        self.selection = SelectionStream(pool)

    def reset_slot(self, slot: int) -> None:
        self.blocks[slot] = 0
        self.counts[slot] = 0

    def dense_step(self, step: int | torch.Tensor) -> bool | torch.Tensor:
        """Whether decode step `step` of a sequence is a cache-correction step (dense for every head)."""
        every = self.options["dense_every"]
        return (step + 1) % every == 0 if every else step < 0

    def begin_step(self, batch: DecodeBatch) -> None:
        size = batch.size
        dense = self.dense_step(batch.steps)[None, :, None]
        torch.logical_or(self.retrieval_rows[:, :size], dense, out=self.full_rows[:, :size])

    def attend(self, layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch) -> torch.Tensor:
        size, selects = batch.size, self.selects[layer]
        self.selection.join()  # the previous selection: its blocks are read, its scores overwritten below
        if self.all_full[layer] and not selects:
            return pool.attention(layer, q, batch, self.scale)[0]
        unit_lse = self.unit_lse[:size] if selects else None
        out, lse = pool.attention(layer, q, batch, self.scale, self.options["block_size"], self.blocks[:size],
                                  self.counts[:size], self.full_rows[layer, :size], unit_lse,
                                  sorted_lists=True, scored_rows=self.scored_rows(layer, size))
        if selects:  # never at the last layer: the next layer's attend joins it
            self.selection.run(lambda: self.hand_on(layer, unit_lse, batch.seq_lens, lse=lse), lse)
        return out

    def scored_rows(self, layer: int, size: int) -> torch.Tensor | None:
        """The rows whose block scores the layer's selection reads: its retrieval rows, or every row when
        the heads share one selection (the sum over all of them)."""
        return None if self.options["share_heads"] else self.retrieval_rows[layer, :size]

    def hand_on(self, layer: int, scores: torch.Tensor, seq_lens: torch.Tensor, lse: torch.Tensor | None = None) -> None:
        """Select blocks from this layer's retrieval-head scores and hand them to later layers.

        scores: block scores [B, Hkv, NB]; or, with `lse` [B, Hq], the pass's per-block log-sum-exp
        [B, Hq, NB], scored inside the selection. On CUDA (modes tokens / ratio) the selection and the
        update of the retrieval rows are one kernel launch; elsewhere the PyTorch path.
        """
        source = dict(scores=scores) if lse is None else dict(unit_lse=scores, lse=lse)
        size = seq_lens.shape[0]
        self.selector.select_into(self.blocks[:size], self.counts[:size], self.retrieval_rows[layer, :size], seq_lens,
                                  aggregate=self.options["aggregate"], share_heads=self.options["share_heads"],
                                  **source)

    def kv_tokens_read(self, seq_len: int, step: int) -> float:
        if self.dense_step(step):
            return self.dense_tokens_read(seq_len)
        retrieval = self.num_retrieval_units()
        sparse = self.roles.retrieval.numel() - retrieval
        return float(retrieval * seq_len + sparse * min(seq_len, self.selector.tokens_kept(seq_len)))

    def num_retrieval_units(self) -> int:
        return self.roles.num_retrieval


class Tidal(Lychee):
    """TidalDecode on the same engine: layer-level selection shared by all heads of the layer."""

    name = "tidal"
    defaults = {**Lychee.defaults, "share_heads": True, "roles": "tidal"}
