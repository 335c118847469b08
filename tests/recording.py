"""Decoding that records every attention output, for tests comparing two decode paths step by step."""
from __future__ import annotations

import torch

from sparsedecode import LLM


def generate_recording(llm: LLM, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and every attention output of one generation."""
    outputs = []
    attend = llm.method.attend

    def recorded(layer, q, cache, seq_lens):
        out = attend(layer, q, cache, seq_lens)
        outputs.append(out.clone())
        return out

    llm.method.attend = recorded
    return llm.generate([prompt], max_new_tokens=new_tokens, stop_token_ids=[])[0].token_ids, outputs
