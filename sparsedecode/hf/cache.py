"""`SparseCache`: a transformers `Cache` whose keys and values live in a paged `KVPool` and whose decode
steps run a sparsedecode method.

Layout: each batch row's real tokens (those its attention mask keeps; a left-padded row starts at its
first real token) fill the blocks of the row's own block table from position 0 on, so a row's pool
positions are the RoPE positions transformers gives it (`position_ids` count a row's real tokens).
transformers keeps its padded view: `get_seq_length` is the padded width its 2D attention mask spans.

Prefill: `update` stores each layer's prompt K/V and hands them back unchanged to the model's own
attention. Decode: the first layer's `update` of a step advances every row (a new block where one
starts, lengths, the step clock, the method's `begin_step`); every layer's `update` stores the new
token, and the attention function calls `attend`. A decode step reads nothing back from the device and
counts no reads: `stats` prices every step at the end, from the rows' lengths.

transformers' `generate` does not tell the model how many tokens it will add, so the pool starts with
the prompts plus SPARE_TOKENS per row and grows by half when a row needs a block and none is free. The
method is planned once, for rows of up to `max_context` tokens (as the engine plans it), so the pool's
size reaches only a method's per-block state (`block_state_bytes`: Quest's page bounds). A growth plans
such a method again and rebuilds its rows from the pool, as for sequences taking a decode slot with the
tokens so far (`reset_slot`, `after_prefill`): exact for Quest, which keeps nothing else across steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache

from ..core import DecodeBatch, KVPool
from ..methods.base import DecodeMethod
from ..models.config import ModelConfig

#: free tokens per row in a new pool: generations shorter than this never grow it
SPARE_TOKENS = 1024


class UnsupportedSettingError(ValueError):
    """A generation setting that sparse decoding inside transformers does not support."""


@dataclass(frozen=True)
class DecodeStats:
    """The K/V reads of one cache's decode steps, per sequence (batch row), in token rows (K and V of one
    KV head of one layer), as the method counts them (`kv_tokens_read`) and as dense attention would."""

    method: str
    decode_steps: int
    kv_tokens_read: tuple[float, ...]
    dense_tokens_read: tuple[float, ...]

    @property
    def kv_fraction_read(self) -> float:
        """All sequences together: rows read over what dense attention reads."""
        dense = sum(self.dense_tokens_read)
        return sum(self.kv_tokens_read) / dense if dense else 0.0

    @property
    def sequence_kv_fraction_read(self) -> tuple[float, ...]:
        return tuple(kv / dense if dense else 0.0 for kv, dense in zip(self.kv_tokens_read, self.dense_tokens_read))


class SparseCache(Cache):
    """The KV cache of one batch of sequences decoded by `method` (which it plans and owns).

    max_context: the most tokens of a sequence, prompt and output; attention_mask: the prompt's 2D mask
    [batch, width] as transformers passes it (left padding), or None when no row is padded.
    """

    def __init__(self, config: ModelConfig, method: DecodeMethod, block_size: int, max_context: int,
                 attention_mask: torch.Tensor | None) -> None:
        super().__init__(layers=[])  # the K/V are in the pool, not in per-layer tensors
        if attention_mask is not None and attention_mask.dim() != 2:
            raise UnsupportedSettingError(
                f"attention_mask of {attention_mask.dim()} dimensions: sparse decoding takes the 2D padding mask")
        self.config, self.method, self.block_size = config, method, block_size
        self.max_context = max_context
        self.max_blocks = -(-max_context // block_size)
        self.prompt_mask = attention_mask
        self.active = True  # cleared when the sparse_decoding block that made it exits
        self.width = 0  # tokens per row in transformers' padded layout
        self.decode_steps = 0
        self.pool: KVPool | None = None
        self.lengths: list[int] = []  # tokens of each row in the pool

    # -- what transformers calls ----------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys and values [batch, kv_heads, tokens, head_dim]; returns them as given
        (the prefill's attention reads them, a decode step's reads the pool)."""
        if not self.active:
            raise RuntimeError("this SparseCache was made inside a sparse_decoding block that has exited; "
                               "outside the block the model attends with its own cache")
        tokens = key_states.shape[2]
        if layer_idx == 0:
            if self.pool is None:
                self._prefill(key_states)
            elif key_states.shape[0] != len(self.lengths):
                raise ValueError(f"a SparseCache of {len(self.lengths)} sequences given a batch of "
                                 f"{key_states.shape[0]}")
            elif tokens == 1:
                self._begin_step()
            else:
                raise UnsupportedSettingError(
                    f"a forward pass of {tokens} tokens on a filled SparseCache: assisted or speculative decoding "
                    "(assistant_model, prompt_lookup_num_tokens) and chunked prefill (prefill_chunk_size) are not "
                    "supported by sparse decoding")
            self.width += tokens
        if self.decoding:
            self.pool.store(layer_idx, self.step_blocks, self.step_offsets, key_states[:, :, 0], value_states[:, :, 0])
        else:
            self.pool.store(layer_idx, self.prompt_blocks, self.prompt_offsets, key_states.transpose(1, 2)[self.real],
                            value_states.transpose(1, 2)[self.real])
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.width + query_length, 0

    @property
    def is_croppable(self) -> bool:
        # generate then refuses assisted decoding (assistant_model, prompt_lookup_num_tokens) after the first
        # forward pass, and never defers its stop check by an extra step to be taken back
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedSettingError("a SparseCache cannot take back cached tokens (the method's state has seen them)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise UnsupportedSettingError("beam search (num_beams > 1) is not supported by sparse decoding")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise UnsupportedSettingError("a SparseCache keeps its batch: expanding it is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise UnsupportedSettingError("a SparseCache keeps its batch: selecting rows is not supported")

    # -- decoding -------------------------------------------------------------------------------
    @property
    def filled(self) -> bool:
        """Whether the prompts are in the pool: every later forward pass is a decode step."""
        return self.pool is not None

    @property
    def decoding(self) -> bool:
        """Whether the forward pass under way is a decode step (one new token per row)."""
        return self.decode_steps > 0

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The method's attention of this decode step's queries q [batch, heads, head_dim]."""
        return self.method.attend(layer, q, self.pool, self.batch)

    def stats(self) -> DecodeStats:
        m, steps = self.method, self.decode_steps
        kv_rows, dense_rows = [], []
        for row, length in enumerate(self.lengths):
            # decode step s (0-based) of this row attended over length - steps + s + 1 tokens
            seq_lens = range(length - steps + 1, length + 1)
            kv = sum((m.kv_tokens_read(n, step) for step, n in enumerate(seq_lens)), 0.0)
            if steps:  # reads decided on the device, priced at the row's mean length over the steps
                kv += m.extra_kv_tokens_read(row, length - (steps - 1) / 2)
            kv_rows.append(kv)
            dense_rows.append(sum((m.dense_tokens_read(n) for n in seq_lens), 0.0))
        return DecodeStats(m.name, steps, tuple(kv_rows), tuple(dense_rows))

    def _prefill(self, key: torch.Tensor) -> None:
        """Size and fill the block tables for the prompt, make the pool and plan the method."""
        batch, kv_heads, width, head_dim = key.shape
        c, bs, device = self.config, self.block_size, key.device
        if (kv_heads, head_dim) != (c.num_kv_heads, c.head_dim):
            raise ValueError(f"keys of {kv_heads} heads x {head_dim}, but the model config says "
                             f"{c.num_kv_heads} x {c.head_dim}")
        mask = self.prompt_mask
        real = torch.ones(batch, width, dtype=torch.bool, device=device) if mask is None else mask.to(device, bool)
        if real.shape != (batch, width):
            raise ValueError(f"attention_mask of shape {tuple(real.shape)} for a prompt of {batch} x {width} tokens")
        if (real[:, 1:] < real[:, :-1]).any():
            raise UnsupportedSettingError("attention_mask pads on the right or inside the prompt: sparse decoding "
                                          "takes left padding (tokenizer.padding_side = 'left')")
        self.lengths = real.sum(1).tolist()
        if min(self.lengths) == 0:
            raise ValueError("a batch row without tokens (its attention mask is all zeros)")
        if max(self.lengths) > self.max_context:
            raise ValueError(f"a prompt of {max(self.lengths)} tokens is longer than max_context={self.max_context}")
        held = [-(-n // bs) for n in self.lengths]
        spare = sum(min(-(-SPARE_TOKENS // bs), self.max_blocks - n) for n in held)
        self.pool = KVPool(c.num_layers, 1 + sum(held) + spare, kv_heads, bs, head_dim, key.dtype, device)
        self.block_tables = torch.zeros(batch, self.max_blocks, dtype=torch.int32, device=device)
        self.next_block = 1  # block 0 is the pool's null block
        for row, n in enumerate(held):
            self.block_tables[row, :n] = torch.arange(self.next_block, self.next_block + n)
            self.next_block += n
        # Token at padded column j of row b sits at position j - (padding of b).
        positions = torch.arange(width, device=device) - (width - real.sum(1, keepdim=True))
        self.real = real
        self.prompt_blocks = self.block_tables.gather(1, positions.clamp(min=0) // bs)[real]
        self.prompt_offsets = (positions % bs)[real]
        self.seq_lens = torch.tensor(self.lengths, dtype=torch.int32, device=device)
        self.steps = torch.zeros(batch, dtype=torch.int32, device=device)
        self.batch = DecodeBatch(self.block_tables, self.seq_lens, self.steps)
        self.method.plan(self.pool, batch, self.max_blocks)

    def _begin_step(self) -> None:
        """Advance every row by one token before layer 0 of a decode step."""
        bs, step = self.block_size, self.decode_steps
        if step == 0:
            self._start_decoding()
        if max(self.lengths) >= self.max_context:
            raise ValueError(f"a sequence grows past max_context={self.max_context}: raise it in sparse_decoding")
        starting = [row for row, n in enumerate(self.lengths) if n % bs == 0]  # the new token opens a block
        if starting:
            self._add_blocks(starting)
        positions = self.seq_lens.long()  # the new tokens'
        self.step_blocks = self.block_tables.gather(1, (positions // bs)[:, None]).squeeze(1)
        self.step_offsets = positions % bs
        self.seq_lens += 1
        self.steps.fill_(step)
        self.lengths = [n + 1 for n in self.lengths]
        self.method.begin_step(self.batch)
        self.decode_steps += 1

    def _start_decoding(self) -> None:
        """Every row takes its decode slot holding its tokens so far (as `ModelRunner.start_decoding`)."""
        rows = [(self.block_tables[row, : -(-n // self.block_size)].long(), n) for row, n in enumerate(self.lengths)]
        for row in range(len(rows)):
            self.method.reset_slot(row)
        for layer in range(self.config.num_layers):
            for blocks, n in rows:
                self.method.after_prefill(layer, self.pool, blocks, n)

    def _add_blocks(self, rows: list[int]) -> None:
        """A new block at the end of each row's table."""
        if self.next_block + len(rows) > self.pool.num_blocks:
            self._grow(len(rows))
        device = self.block_tables.device
        ids = torch.arange(self.next_block, self.next_block + len(rows), dtype=torch.int32, device=device)
        index = torch.tensor([self.lengths[row] // self.block_size for row in rows], device=device)
        self.block_tables[torch.tensor(rows, device=device), index] = ids
        self.next_block += len(rows)

    def _grow(self, needed: int) -> None:
        old = self.pool
        self.pool = KVPool(old.num_layers, old.num_blocks + max(needed, old.num_blocks // 2), old.num_kv_heads,
                           old.block_size, old.head_dim, old.dtype, old.device)
        self.pool.k[:, : old.num_blocks] = old.k
        self.pool.v[:, : old.num_blocks] = old.v
        if self.method.block_state_bytes(self.block_size, old.dtype):  # state per pool block: sized by the pool
            self.method.plan(self.pool, len(self.lengths), self.max_blocks)
            self._start_decoding()
