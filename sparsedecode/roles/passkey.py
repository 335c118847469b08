"""Calibration data: multi-passkey prompts. Ten random 5-digit keys are hidden at sentence ends in a
window of real text, and the answer recites them in order, so that reciting key j needs the tokens of
needle j from far back in the context.
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from typing import Any

import torch

NUM_PASSKEYS = 10
DEPTH_RANGE = (0.05, 0.95)
MIN_FILLER = 64  # tokens of haystack a prompt needs at least, so the keys sit in text and not side by side
QUESTION = (
    f"\n\nWhat are the {NUM_PASSKEYS} passkeys hidden in the text above? "
    "List them in the order they appear, separated by commas."
)


@dataclass
class PasskeySample:
    prompt: torch.Tensor  # [P] token ids, the context
    answer: torch.Tensor  # [m] token ids: the keys, in order, separated by ", "
    needle_spans: list[tuple[int, int]]  # prompt positions of needle j
    key_spans: list[tuple[int, int]]  # answer positions of key j


class PasskeyPrompts:
    """Multi-passkey prompts: 10 random 5-digit keys hidden at random depths in 0.05-0.95 of a window of
    `text` (at sentence ends), total lengths uniform in [min_length, max_length] tokens, in the model's
    chat template. A text shorter than max_length tokens is repeated. Reproducible from `seed`."""

    def __init__(self, tokenizer: Any, text: str, min_length: int, max_length: int, seed: int) -> None:
        if tokenizer is None:
            raise ValueError("calibration needs the model's tokenizer (random-weight shapes have none)")
        if not 0 < min_length <= max_length:
            raise ValueError(f"need 0 < min length <= max length, got {min_length} and {max_length}")
        self.tokenizer = tokenizer
        self.min_length, self.max_length = min_length, max_length
        self.prefix, self.suffix = (self._encode(part) for part in self._template())
        self.question = self._encode(QUESTION)
        overhead = len(self.prefix) + len(self.question) + len(self.suffix)
        overhead += NUM_PASSKEYS * len(self._needle(NUM_PASSKEYS, 99999))
        if min_length < overhead + MIN_FILLER:
            raise ValueError(
                f"min length {min_length} is too short: {NUM_PASSKEYS} passkeys and the question take "
                f"{overhead} tokens; use at least {overhead + MIN_FILLER}"
            )
        filler = self._encode(text)
        if not filler:
            raise ValueError("the haystack text is empty")
        self.filler = filler * math.ceil(max_length / len(filler))
        ends = {t for t in set(filler) if tokenizer.decode([t]).rstrip().endswith((".", "!", "?"))}
        self.breaks = [i + 1 for i, t in enumerate(self.filler) if t in ends]
        self.rng = random.Random(seed)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _template(self) -> tuple[str, str]:
        """The prompt text before and after the user's message."""
        if not getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.bos_token or "", "\nAnswer: "
        marker = "\x00MESSAGE\x00"
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        before, after = rendered.split(marker)
        return before, after

    def _needle(self, number: int, key: int) -> list[int]:
        return self._encode(f" The passkey number {number} is {key}.")

    def _snap(self, position: int, limit: int) -> int:
        """The first sentence end at or after `position`, not beyond `limit`."""
        i = bisect.bisect_left(self.breaks, position)
        return min(self.breaks[i], limit) if i < len(self.breaks) else limit

    def sample(self) -> PasskeySample:
        rng = self.rng
        length = rng.randint(self.min_length, self.max_length)
        keys = [rng.randint(10000, 99999) for _ in range(NUM_PASSKEYS)]
        needles = [self._needle(j + 1, key) for j, key in enumerate(keys)]
        fixed = len(self.prefix) + len(self.question) + len(self.suffix) + sum(map(len, needles))
        n = length - fixed
        start = rng.randrange(len(self.filler) - n + 1)
        cuts = sorted(self._snap(start + round(rng.uniform(*DEPTH_RANGE) * n), start + n) for _ in keys)
        prompt, needle_spans, previous = list(self.prefix), [], start
        for cut, needle in zip(cuts, needles):
            prompt += self.filler[previous:cut]
            needle_spans.append((len(prompt), len(prompt) + len(needle)))
            prompt += needle
            previous = cut
        prompt += self.filler[previous : start + n] + self.question + self.suffix
        answer, key_spans = [], []
        for j, key in enumerate(keys):
            piece = self._encode(f", {key}" if j else str(key))
            key_spans.append((len(answer), len(answer) + len(piece)))
            answer += piece
        return PasskeySample(torch.tensor(prompt), torch.tensor(answer), needle_spans, key_spans)
