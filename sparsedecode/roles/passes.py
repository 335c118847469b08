"""The differentiable passes of calibration, over one passkey prompt.

- The prompt is prefilled densely in chunks of 1000 tokens, without gradients, into a KV cache that
  teacher and student then share.
- The answer tokens (the keys) run after it as one short causal sequence, once densely (the teacher)
  and once with attention `z * dense + (1 - z) * sparse` per (layer, KV head) unit (the student), with
  the unit's gate z.
- The loss is the squared difference of the final hidden states, mean over the hidden size, summed over
  the answer tokens, divided by their number.

Sparse attention of the student is the lychee decode attention in ratio mode (sink and newest block
always kept), per answer token as if it were a decode step. Which blocks a sparse unit reads flows down
the layers as at inference: a unit whose z exceeds 0.5 counts as a retrieval head in this pass and
hands the top blocks of its own dense attention to the same KV-head index of the following layers; a
sparse unit reads what the nearest earlier such unit handed on (layer 0 always hands on). So a sparse
unit's error, and with it the push to open its gate, grows with the staleness of the blocks it
inherits, as at inference. Block choice and hand-on follow z without gradient (a hard top-k);
gradients reach z through the mixing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.reference import visible_tokens
from ..core.selection import BlockSelector, block_scores
from ..models.loader import LoadedModel
from ..models.transformer import Transformer, prefill_attention
from .passkey import PasskeySample

PREFILL_CHUNK = 1000
HANDS_ON = 0.5  # a gate above this makes the unit a retrieval head for the pass's block hand-on


@dataclass
class ContextKV:
    """The K/V of one prompt, [layers, kv_heads, capacity, head_dim] each, shared by teacher and student."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.k.device


def new_cache(loaded: LoadedModel, max_length: int) -> ContextKV:
    """A one-sequence cache for prompts of up to `max_length` tokens, reused by every step."""
    c = loaded.config
    weight = next(loaded.model.parameters())
    shape = (c.num_layers, c.num_kv_heads, -(-max_length // PREFILL_CHUNK) * PREFILL_CHUNK, c.head_dim)
    return ContextKV(torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                     torch.zeros(shape, dtype=weight.dtype, device=weight.device))


def prefill_context(model: Transformer, cache: ContextKV, prompt: torch.Tensor) -> torch.Tensor:
    """Dense chunked prefill of the prompt into `cache` (no gradients); returns the last token's final
    normalised hidden state [hidden]."""
    prompt = prompt.to(cache.device)
    for start in range(0, prompt.shape[0], PREFILL_CHUNK):
        chunk = prompt[start : start + PREFILL_CHUNK]
        end = start + chunk.shape[0]

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[layer, :, start:end], cache.v[layer, :, start:end] = k.transpose(0, 1), v.transpose(0, 1)
            keys, values = cache.k[layer, :, :end], cache.v[layer, :, :end]
            return prefill_attention(q.transpose(0, 1), keys, values).transpose(0, 1)

        x = model.forward(chunk, torch.arange(start, end, device=cache.device), attention)
    return model.norm(x[-1])


def _handed_blocks(
    logits: torch.Tensor, seq_lens: torch.Tensor, selector: BlockSelector, aggregate: str
) -> torch.Tensor:
    """The tokens each answer token's KV heads hand on: the selector's top blocks of the dense attention.
    logits: [Hkv, G, m, T] scores with the causal mask applied -> visible tokens [m, Hkv, T]."""
    heads, group, m, capacity = logits.shape
    unit_lse = logits.view(heads, group, m, -1, selector.block_size).logsumexp(-1)
    scores = block_scores(
        unit_lse.permute(2, 0, 1, 3).reshape(m, heads * group, -1),
        logits.logsumexp(-1).permute(2, 0, 1).reshape(m, heads * group),
        heads,
        aggregate,
    )
    blocks, counts = selector.select(scores, seq_lens, selector.list_length(capacity))
    return visible_tokens(seq_lens, capacity, selector.block_size, blocks, counts, None, heads)


def answer_hidden_states(
    model: Transformer,
    cache: ContextKV,
    context_len: int,
    answer: torch.Tensor,
    gates: torch.Tensor | None = None,
    selector: BlockSelector | None = None,
    aggregate: str = "max",
    on_attention: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Final normalised hidden states [m, hidden] of the answer tokens at positions context_len ..
    context_len + m, causal among themselves, over the `context_len` tokens cached in sequence 0.
    gates None: the dense teacher. gates [layers, Hkv]: the student, unit attention
    `z * dense + (1 - z) * sparse` with blocks from `selector` (see the module doc).
    on_attention(layer, probs [Hkv, G, m, T]) sees each layer's dense attention."""
    c = model.config
    m, heads = answer.shape[0], c.num_kv_heads
    device = cache.device
    end = context_len + m
    capacity = -(-end // selector.block_size) * selector.block_size if gates is not None else end
    positions = torch.arange(context_len, end, device=device)
    seq_lens = positions + 1
    causal = torch.arange(capacity, device=device) < seq_lens[:, None]
    cos, sin = model.rope(positions, cache.k.dtype)
    hands_on = (gates > HANDS_ON).cpu() if gates is not None else None  # one host sync per pass
    handed = None  # [m, Hkv, T]: tokens the sparse units of each KV-head index read
    x = model.embed_tokens(answer.to(device))
    for i, layer in enumerate(model.layers):
        q, k, v = layer.attention_input(x, cos, sin)
        cached_k, cached_v = cache.k[i, :, :context_len], cache.v[i, :, :context_len]
        keys = F.pad(torch.cat([cached_k, k.transpose(0, 1)], dim=1).float(), (0, 0, 0, capacity - end))
        values = F.pad(torch.cat([cached_v, v.transpose(0, 1)], dim=1).float(), (0, 0, 0, capacity - end))
        queries = q.float().view(m, heads, c.group_size, c.head_dim) * c.head_dim**-0.5
        logits = torch.einsum("mhgd,htd->hgmt", queries, keys)
        causal_logits = logits.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(causal_logits, dim=-1)
        out = torch.einsum("hgmt,htd->mhgd", probs, values)
        if on_attention is not None:
            on_attention(i, probs)
        if gates is not None:
            if handed is not None:
                sparse = torch.softmax(logits.masked_fill(~handed.transpose(0, 1)[:, None], float("-inf")), dim=-1)
                z = gates[i].view(1, heads, 1, 1)
                out = z * out + (1 - z) * torch.einsum("hgmt,htd->mhgd", sparse, values)
            if hands_on[i].any() and i + 1 < c.num_layers:
                with torch.no_grad():
                    chosen = _handed_blocks(causal_logits, seq_lens, selector, aggregate)
                keep = hands_on[i].to(device)[None, :, None]
                handed = chosen if handed is None else torch.where(keep, chosen, handed)
        x = layer.attention_output(x, out.to(x.dtype))
    return model.norm(x)


def distillation_loss(
    model: Transformer, cache: ContextKV, sample: PasskeySample, gates: torch.Tensor, selector: BlockSelector,
    aggregate: str = "max",
) -> torch.Tensor:
    """Squared difference of the student's and the dense teacher's final hidden states over the answer:
    mean over the hidden size, summed over the answer tokens, divided by their number. The prompt must
    be in `cache` already."""
    context_len = sample.prompt.shape[0]
    with torch.no_grad():
        teacher = answer_hidden_states(model, cache, context_len, sample.answer)
    student = answer_hidden_states(model, cache, context_len, sample.answer, gates, selector, aggregate)
    return (student.float() - teacher.float()).pow(2).mean(-1).sum() / sample.answer.shape[0]
