"""Decoding that records what a method's `attend` sees and returns, for tests comparing two decode paths step by
step or checking a method's state against the pool."""
from __future__ import annotations

from collections.abc import Callable

import torch

from sparsedecode import LLM
from sparsedecode.core import DecodeBatch, KVPool
from sparsedecode.methods.base import DecodeMethod

#: called after each `attend` with (layer, q, pool, batch, out)
AttendHook = Callable[[int, torch.Tensor, KVPool, DecodeBatch, torch.Tensor], None]


def wrap_attend(method: DecodeMethod, before: AttendHook | None = None, after: AttendHook | None = None) -> None:
    """Replace `method.attend` (on the instance) by one calling `before(layer, q, pool, batch, None)` ahead of
    the real attend and `after(layer, q, pool, batch, out)` once it returned."""
    attend = method.attend

    def recorded(layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch) -> torch.Tensor:
        if before is not None:
            before(layer, q, pool, batch, None)
        out = attend(layer, q, pool, batch)
        if after is not None:
            after(layer, q, pool, batch, out)
        return out

    method.attend = recorded


def record_outputs(method: DecodeMethod) -> list[torch.Tensor]:
    """Every attention output of `method` from now on (copies, in call order: step by step, layer by layer)."""
    outputs: list[torch.Tensor] = []
    wrap_attend(method, after=lambda layer, q, pool, batch, out: outputs.append(out.clone()))
    return outputs


def generate_recording(llm: LLM, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and every attention output of one generation (its decode steps, layer by layer)."""
    outputs = record_outputs(llm.method)
    return llm.generate([prompt], max_new_tokens=new_tokens, stop_token_ids=[])[0].token_ids, outputs
