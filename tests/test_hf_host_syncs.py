"""A decode step inside `sparse_decoding` reads nothing back to the host and loops over no sequence in
Python, for every method: on a GPU either would stall or lengthen every step (a read waits for the
queued device work; a loop adds launches per sequence).

Measured on CPU with the PyTorch profiler over one forward pass of a tiny random Llama (a left-padded
batch, the attention mask passed as `generate` passes it). On CPU the attention op and Quest's page
scores run their PyTorch references (`kernels/reference.py`), which read the lengths to the host by
design; on CUDA each is Triton launches that read nothing back. Every other read would happen on the GPU
too.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sparsedecode.hf import SparseCache, cache_keyword, sparse_decoding
from sparsedecode.methods import METHODS

#: ops that read a device tensor back to the host (or need its values to size their output)
HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
              "aten::unique_consecutive", "aten::unique_dim", "aten::repeat_interleave"}
#: the CPU references of the GPU kernels (see the module docstring)
REFERENCES = "sparsedecode/kernels/reference.py"
BLOCK = 16
#: prompt lengths: the first three decode steps open no block (opening one is host work of that step only)
PROMPTS = (41, 26)


def tiny_llama(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def sparse_options(name: str) -> dict:
    """A budget of a fraction of the prompts, in blocks of 16 tokens where the method has blocks."""
    defaults = METHODS[name].defaults
    return {**({"budget": 2 * BLOCK} if "budget" in defaults else {}),
            **({"block_size": BLOCK} if "block_size" in defaults else {})}


def profiled_decode_step(model: LlamaForCausalLM, name: str, rows: int) -> torch.profiler.profile:
    """The profile of the third decode step of `rows` left-padded prompts inside sparse_decoding(name)."""
    lengths = torch.tensor(PROMPTS[:rows])
    width = int(lengths.max())
    mask = (torch.arange(width) >= width - lengths[:, None]).long()
    ids = torch.randint(1, 64, (rows, width), generator=torch.Generator().manual_seed(1)) * mask
    with torch.no_grad(), sparse_decoding(model, name, max_context=256, **sparse_options(name)):
        key = cache_keyword(model)
        out = model(input_ids=ids, attention_mask=mask, **{key: DynamicCache()}, use_cache=True, logits_to_keep=1)
        cache = getattr(out, key)
        assert isinstance(cache, SparseCache)  # the forward took the cache: the steps below go through it
        for step in range(3):
            tokens = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype)], dim=1)
            inputs = {"input_ids": tokens, "attention_mask": mask, key: cache, "use_cache": True,
                      "position_ids": mask.sum(1, keepdim=True) - 1, "cache_position": torch.tensor([mask.shape[1] - 1])}
            if step < 2:
                out = model(**inputs)
                continue
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
                out = model(**inputs)
    return prof


def python_stack(event: Any) -> list[str]:
    """The Python frames around the op, innermost first: with `with_stack` the profiler records each
    Python call as an event ("file.py(line): function") around the ops it makes."""
    frames = []
    while event is not None:
        frames.extend(event.stack or ([event.name] if ".py(" in event.name else []))
        event = event.cpu_parent
    return frames


def ops(prof: torch.profiler.profile) -> list[tuple[str, list[str]]]:
    """The ops of the profile outside the CPU references, each with its Python frames."""
    found = [(e.name, python_stack(e)) for e in prof.events() if e.name.startswith("aten::")]
    return [(name, stack) for name, stack in found if not any(REFERENCES in frame for frame in stack)]


def host_reads(prof: torch.profiler.profile) -> list[str]:
    return [f"{name} at {' < '.join(stack[:4])}" for name, stack in ops(prof) if name in HOST_READS]


def test_the_profiled_steps_open_no_block() -> None:
    assert all(n % BLOCK and (n + 3) // BLOCK == n // BLOCK for n in PROMPTS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_decode_step_reads_nothing_back_to_the_host(name: str) -> None:
    """Reads in the step before its first layer or in any layer (hf cache, the method, transformers' mask
    for the padded batch) would show here, once per step or once per layer."""
    assert host_reads(profiled_decode_step(tiny_llama(3), name, rows=2)) == []


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_decode_step_issues_the_same_ops_for_one_sequence_as_for_two(name: str) -> None:
    """No Python loop over the batch rows in the step: the op counts do not depend on the batch size."""
    model = tiny_llama(2)
    one, two = (Counter(op for op, _ in ops(profiled_decode_step(model, name, rows))) for rows in (1, 2))
    assert two == one, {op: (one[op], two[op]) for op in one.keys() | two.keys() if one[op] != two[op]}
