"""Next-token choice on the device, per row: greedy, or temperature with top-k / top-p filtering.

Sampling is Gumbel-max with noise hashed from (the request's seed, the position of the token, the token
id), so a seeded request draws the same tokens whatever shares its batch, and a step needs no generator
state: it can be captured in a CUDA graph and replayed.
"""
from __future__ import annotations

from dataclasses import dataclass

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
                  seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] int64; row b greedy where temperature[b] == 0, else sampled at
    temperature[b] from its top_k[b] tokens (0: all) within top-p mass top_p[b]. `positions` [B]: where the
    sampled token goes (the noise's key with `seeds`)."""
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    ranked, order = scaled.sort(dim=-1, descending=True)
    probs = ranked.softmax(dim=-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    # The smallest prefix whose mass reaches top_p (the first token always stays), within the top k.
    keep = ((rank < top_k[:, None]) | (top_k[:, None] == 0)) & (probs.cumsum(dim=-1) - probs < top_p[:, None])
    noise = gumbel_noise(seeds, positions, logits.shape[-1]).gather(1, order)
    choice = torch.where(keep, ranked + noise, float("-inf")).argmax(dim=-1, keepdim=True)
    sampled = order.gather(1, choice).squeeze(1)
    return torch.where(temperature > 0, sampled, greedy)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits, before temperature,
    top-k and top-p) and the `top` most likely tokens of that step as (token id, log-probability), most
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
