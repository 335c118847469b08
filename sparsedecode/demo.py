"""The demo: a needle hidden in real essays, answered by dense decoding and by each sparse method."""
from __future__ import annotations

import random

import torch
from rich.console import Console
from rich.table import Table

from . import LLM
from .data.haystack import haystack_text
from .methods import METHODS

GPU_SPEED_NOTE = ("Speed-ups are a GPU property: a sparse method reads less of the KV cache, which bounds a GPU "
                  "decode step at long context.")
CPU_SPEED_NOTE = (" On a CPU at a few thousand tokens the weights dominate a step and block selection adds work: "
                  "the methods decode at about dense's speed, a little faster or slower from run to run.")

NEEDLE = "The special magic number for the demo is {value}."
QUESTION = "What is the special magic number for the demo mentioned in the text above? Answer with the number only."
ANSWER_ROOM = 128  # tokens of context beyond the haystack: the question's template and the answer


def needle_prompt(llm: LLM, context: int, depth: float, value: str) -> str:
    """Essay text of about `context` tokens with the needle at `depth` (0 = start, 1 = end)."""
    tokenizer = llm.tokenizer
    essay_ids = tokenizer(haystack_text(), add_special_tokens=False).input_ids
    room = context - len(tokenizer(NEEDLE.format(value=value) + QUESTION).input_ids) - 64
    if room < 64:
        raise ValueError(f"context {context} is too short for the needle prompt")
    essay_ids = (essay_ids * (1 + room // len(essay_ids)))[:room]
    cut = int(len(essay_ids) * depth)
    text = tokenizer.decode(essay_ids[:cut]) + " " + NEEDLE.format(value=value) + " " + tokenizer.decode(essay_ids[cut:])
    return llm.apply_chat_template(f"{text}\n\n{QUESTION}")


def demo_settings(model: str | None, context: int | None, budget: int | None,
                  device: str | None) -> tuple[str, int, int]:
    """(model, haystack tokens, sparse budget) with the defaults of the device it runs on filled in."""
    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    model = model or ("qwen2.5-coder-1.5b" if on_gpu else "qwen2.5-coder-0.5b")
    context = context or (32768 if on_gpu else 3072)
    return model, context, budget or max(256, context // 8 // 64 * 64)


def run_demo(model: str, context: int, methods: list[str], budget: int, device: str | None) -> None:
    console = Console()
    console.print(f"[bold]sparsedecode demo[/]: {model}, {context}-token haystack, sparse budget {budget} tokens")
    llm = LLM(model, device=device, max_context=context + ANSWER_ROOM)
    value = str(random.Random(context).randrange(100000, 999999))
    prompt = needle_prompt(llm, context, depth=0.4, value=value)

    table = Table("method", "answer", "correct", "prefill s", "decode tok/s", "KV read")
    for method in methods:
        llm.use_method(method, **({"budget": budget} if "budget" in METHODS[method].defaults else {}))
        result = llm.generate([prompt], max_new_tokens=32)[0]
        answer = " ".join(result.text.split())
        table.add_row(
            method, answer[:40], "yes" if value in result.text else "no",
            "reused" if result.prefill_reused else f"{result.prefill_seconds:.1f}",
            f"{result.decode_tokens_per_s:.1f}", f"{result.kv_fraction_read:.1%}",
        )
        console.print(f"{method}: {answer[:60]!r}")
    console.print(f"needle value: {value}")
    console.print(table)
    console.print(GPU_SPEED_NOTE + ("" if llm.device.type == "cuda" else CPU_SPEED_NOTE))
