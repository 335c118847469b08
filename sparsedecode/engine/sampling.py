"""Next-token choice on the device, per row: greedy, or temperature with top-k / top-p / min-p filtering,
after the row's penalties and logit bias (`Penalties`). Rows that filter nothing (an API request's
defaults) sample without sorting the vocabulary (`sample_unfiltered`), the same tokens.

Sampling is Gumbel-max with noise hashed from (the request's seed, the position of the token, the token
id), so a seeded request draws the same tokens whatever shares its batch, and a step needs no generator
state: it can be captured in a CUDA graph and replayed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # the most top log-probabilities a request may ask per token (vLLM's default limit)

_MIX1 = 0xBF58476D1CE4E5B9 - 2**64  # splitmix64's multipliers, as int64
_MIX2 = 0x94D049BB133111EB - 2**64
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 Gumbel(0, 1) noise, a pure function of (seed, position, token id)."""
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = (seeds[:, None] * _GOLDEN + positions[:, None] * _MIX2) ^ token[None, :]
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    uniform = (_shift_right(x, 40).float() + 0.5) * 2.0**-24  # 24 random bits, strictly inside (0, 1)
    return -torch.log(-torch.log(uniform))


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  seeds: torch.Tensor, positions: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] int64; row b greedy where temperature[b] == 0, else sampled at
    temperature[b] from its top_k[b] tokens (0: all) within top-p mass top_p[b] and, with `min_p`, at least
    min_p[b] times the most likely token's probability. `positions` [B]: where the sampled token goes (the
    noise's key with `seeds`)."""
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    ranked, order = scaled.sort(dim=-1, descending=True)
    probs = ranked.softmax(dim=-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    # The smallest prefix whose mass reaches top_p (the first token always stays), within the top k.
    keep = ((rank < top_k[:, None]) | (top_k[:, None] == 0)) & (probs.cumsum(dim=-1) - probs < top_p[:, None])
    if min_p is not None:
        keep &= probs >= min_p[:, None] * probs[:, :1]
    noise = gumbel_noise(seeds, positions, logits.shape[-1]).gather(1, order)
    choice = torch.where(keep, ranked + noise, float("-inf")).argmax(dim=-1, keepdim=True)
    sampled = order.gather(1, choice).squeeze(1)
    return torch.where(temperature > 0, sampled, greedy)


def sample_unfiltered(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """`sample_tokens` for rows without top-k, top-p or min-p: Gumbel-max over the whole vocabulary with the same
    noise, so the same tokens, without its sort, softmax and cumulative sum over the vocabulary."""
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    sampled = (scaled + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits, before penalties,
    temperature, top-k and top-p) and the `top` most likely tokens of that step as (token id, log-probability), most
    likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_top: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of `tokens` [B] under logits [B, V] float32, and the `num_top` largest of each row:
    (chosen [B], top values [B, num_top], top ids [B, num_top]). Fixed shapes: capturable."""
    logp = logits.log_softmax(dim=-1)
    values, ids = logp.topk(num_top, dim=-1)
    return logp.gather(1, tokens[:, None]).squeeze(1), values, ids


@dataclass
class PenaltyRow:
    """A decode row's penalties and logit bias (`SamplingParams`' fields of those names), and the tokens they
    apply to where its slot's device state is (re)written (its first step in the slot): `stop_ids`, kept out
    until `min_tokens` are out (ids outside the vocabulary ignored), and the sequence's prompt and output so
    far; `output_ids` None where the device holds them."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_ids: list[int] = field(default_factory=list)
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None

    @property
    def biased(self) -> float:
        """1.0 where the row adds a logit bias, else 0.0: the weight of its slot's bias table."""
        return float(bool(self.logit_bias))


class Penalties:
    """Per decode slot, on the device: its output tokens' counts, its prompt's tokens, its logit bias, the
    tokens `min_tokens` keeps out, and its scalars. `apply` and `count` have fixed shapes (capturable). A slot's
    tables are only read where its scalars say so (a bias weight of 0, no repetition penalty, ...), so a slot
    that a penalized sequence left needs no clearing for the next one."""

    SCALARS = ("presence", "frequency", "repetition", "min_p", "min_tokens", "biased")

    def __init__(self, slots: int, vocab_size: int, device: torch.device) -> None:
        def zeros(dtype: torch.dtype, *shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.counts = zeros(torch.int32, slots, vocab_size)
        self.in_prompt = zeros(torch.bool, slots, vocab_size)
        self.bias = zeros(torch.float32, slots, vocab_size)
        self.stop = zeros(torch.bool, slots, vocab_size)
        self.presence, self.frequency, self.repetition, self.min_p, self.biased = (zeros(torch.float32, slots)
                                                                                  for _ in range(5))
        self.min_tokens, self.generated = zeros(torch.int32, slots), zeros(torch.int32, slots)

    def load(self, rows: list[tuple[int, PenaltyRow | None]], size: int) -> None:
        """Set the scalars of slots [0, size) from the given (slot, row) pairs (neutral for the other slots),
        and rewrite the tables of the slots whose row carries its history."""
        by_slot = dict(rows)
        per_slot = [by_slot.get(slot) or PenaltyRow() for slot in range(size)]
        for name in self.SCALARS:
            target = getattr(self, name)[:size]
            target.copy_(torch.tensor([getattr(r, name) for r in per_slot], dtype=target.dtype))
        for slot, row in rows:
            if row is None or row.output_ids is None:
                continue
            self.counts[slot].zero_()
            self.counts[slot].index_add_(0, _ids(row.output_ids, self.counts),
                                         torch.ones(len(row.output_ids), dtype=torch.int32, device=self.counts.device))
            vocab_size = self.stop.shape[1]
            stop_ids = [t for t in row.stop_ids if 0 <= t < vocab_size]  # other ids are never sampled
            for table, ids in ((self.in_prompt, row.prompt_ids or []), (self.stop, stop_ids)):
                table[slot].zero_()
                table[slot, _ids(ids, table)] = True
            self.bias[slot].zero_()
            self.bias[slot, _ids(list(row.logit_bias), self.bias)] = torch.tensor(
                list(row.logit_bias.values()), dtype=torch.float32, device=self.bias.device)
            self.generated[slot] = len(row.output_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The penalized logits of rows [0, B) (logits [B, V] float32), in vLLM's order: bias and min_tokens,
        then the repetition, frequency and presence penalties."""
        size = logits.shape[0]
        counts = self.counts[:size]
        logits = logits + self.biased[:size, None] * self.bias[:size]
        held_back = self.stop[:size] & (self.generated[:size] < self.min_tokens[:size])[:, None]
        logits = logits.masked_fill(held_back, float("-inf"))
        seen = self.in_prompt[:size] | (counts > 0)
        repetition = self.repetition[:size, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
        return logits - self.frequency[:size, None] * counts - self.presence[:size, None] * (counts > 0)

    def count(self, tokens: torch.Tensor) -> None:
        """Add each row's sampled token (tokens [B] int64) to its counts."""
        size = tokens.shape[0]
        self.counts[:size].scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.int32))
        self.generated[:size] += 1


def _ids(ids: list[int], table: torch.Tensor) -> torch.Tensor:
    """Token ids as an index tensor on the table's device."""
    return torch.tensor(ids, dtype=torch.int64, device=table.device)
