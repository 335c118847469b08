"""What every eval task shares: the sample record, the prompt format, the essay haystack, and fitting a
prompt to a target token length."""
from __future__ import annotations

import random
import re
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from .qa import QaSet

T = TypeVar("T")

# RULER's needle depths: 40 evenly spaced percentages of the haystack, rounded to whole percents
DEPTH_GRID: tuple[float, ...] = tuple(round(i * 100 / 39) / 100 for i in range(40))

MAX_FIT_PROBES = 40
MAX_GROWTH = 8  # a probe at most this many times the last size, so a bad first rate cannot build a huge prompt

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_VOCABULARY_WORD = re.compile(r"\b[a-z]{4,12}\b")


@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # the target prompt length in tokens (the generation budget for the reasoning suite)
    index: int
    prompt: str
    references: list[str]
    depths: list[float]  # where each needle sits: the share of the haystack's characters before it
    prompt_tokens: int
    max_new_tokens: int
    metric: str


@dataclass(frozen=True)
class Draft:
    """A task instance before the chat template: the user message and the start of the answer."""
    message: str
    answer_prefix: str
    references: list[str]
    depths: list[float]


def length_tolerance(target: int) -> int:
    """How far below `target` a fitted prompt may end: 2% or 64 tokens, whichever is larger."""
    return max(64, round(0.02 * target))


class PromptFormat:
    """Turns a task's message into the model's prompt string, and counts its tokens as `LLM.generate` does."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, message: str, answer_prefix: str = "") -> str:
        """The chat template's user turn, then the assistant turn opened with `answer_prefix`
        (RULER starts every answer with such a prefix)."""
        prefix = answer_prefix.strip()
        if self.has_chat_template:
            head = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
            return head + prefix
        prefix = prefix.removeprefix("Answer:").strip()
        return f"Question: {message}\nAnswer:" + (f" {prefix}" if prefix else "")

    def count_tokens(self, prompt: str) -> int:
        bos = getattr(self.tokenizer, "bos_token", None)
        # LLM.generate adds the special tokens unless the text already starts with BOS
        add_special = not (bos and prompt.startswith(bos))
        return len(self.tokenizer(prompt, add_special_tokens=add_special, verbose=False)["input_ids"])


class EssayHaystack:
    """Essay text cut into sentences once, so a haystack of n sentences is a slice."""

    def __init__(self, text: str) -> None:
        flat = " ".join(text.split())  # RULER flattens all whitespace to single spaces
        starts = [0, *(m.end() for m in _SENTENCE_END.finditer(flat))]
        self.sentences = [s for a, b in zip(starts, [*starts[1:], len(flat)]) if (s := flat[a:b].strip())]
        if not self.sentences:
            raise ValueError("the haystack text is empty")
        self.text = flat

    def units(self, count: int) -> list[str]:
        """The first `count` sentences, going round the essays again when they run out."""
        rounds, rest = divmod(count, len(self.sentences))
        return self.sentences * rounds + self.sentences[:rest]

    @cached_property
    def vocabulary(self) -> list[str]:
        """The distinct lowercase words of 4 to 12 letters, sorted (a pool of real words for word tasks)."""
        return sorted(set(_VOCABULARY_WORD.findall(self.text)))


class EvalResources:
    """What task builders share: the prompt format, the essay haystack (loaded on first use) and QA sets."""

    def __init__(self, tokenizer: Any, haystack_source: str | Path | None = None,
                 qa_sets: Mapping[str, QaSet] | None = None) -> None:
        self.format = PromptFormat(tokenizer)
        self.haystack_source = haystack_source
        self.qa_sets: Mapping[str, QaSet] = qa_sets or {}

    @cached_property
    def essays(self) -> EssayHaystack:
        from sparsedecode.data.haystack import haystack_text

        return EssayHaystack(haystack_text(self.haystack_source))


@dataclass(frozen=True)
class BuildContext:
    resources: EvalResources
    length: int  # target prompt tokens
    index: int  # the sample's number within its task and length
    seed_key: str

    def rng(self) -> random.Random:
        """A fresh generator per build, so every probe of the length fit draws the same keys and values."""
        return random.Random(self.seed_key)


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # a name in scoring.METRICS
    max_new_tokens: int
    build: Callable[[BuildContext, int], Draft]  # (context, haystack size in units) -> draft


@dataclass(frozen=True)
class Fitted(Generic[T]):
    size: int
    value: T
    prompt: str
    tokens: int


def fit_to_length(render: Callable[[int], tuple[T, str]], count_tokens: Callable[[str], int],
                  target: int, guess: int = 16) -> Fitted[T]:
    """The haystack size whose prompt has between `target - length_tolerance(target)` and `target` tokens.

    Token counts grow almost linearly with the size, so a secant step inside a shrinking bracket
    needs a handful of tokenisations where a plain bisection needs ~15. If one haystack unit alone
    is longer than the tolerance, the largest size that stays within `target` is returned.
    """
    tolerance = length_tolerance(target)
    aim = target - tolerance / 2

    def probe(size: int) -> Fitted[T]:
        value, prompt = render(size)
        return Fitted(size, value, prompt, count_tokens(prompt))

    base = under = probe(0)
    if base.tokens > target:
        raise ValueError(f"a prompt of {target} tokens is not possible: without any haystack it already "
                         f"has {base.tokens} tokens")
    over: Fitted[T] | None = None
    size = max(guess, 1)
    probes = 0
    while under.tokens < target - tolerance and (over is None or over.size - under.size > 1):
        if probes == MAX_FIT_PROBES:
            raise RuntimeError(f"no haystack size fits {target} tokens after {probes} probes "
                               f"(closest below: {under.tokens} tokens)")
        probes += 1
        current = probe(size)
        if current.tokens > target:
            over = current
        else:
            under = current
        if over is None:
            rate = max((under.tokens - base.tokens) / under.size, 1e-3)
            size = min(under.size + max(1, round((aim - under.tokens) / rate)), under.size * MAX_GROWTH)
        else:
            step = (aim - under.tokens) * (over.size - under.size) / (over.tokens - under.tokens)
            size = min(max(under.size + round(step), under.size + 1), over.size - 1)
    return under


def insert_at_depths(units: Sequence[str], inserts: Sequence[str], depths: Sequence[float]) -> list[str]:
    """`units` with each insert at the unit boundary whose share of the characters before it is nearest
    its depth (0 = first, 1 = last). Inserts at the same boundary keep their order."""
    before = list(accumulate((len(u) + 1 for u in units), initial=0))  # +1: the separator
    positions = [_nearest_index(before, depth * before[-1]) for depth in depths]
    result: list[str] = []
    start = 0
    for k in sorted(range(len(inserts)), key=lambda k: (positions[k], k)):
        result.extend(units[start:positions[k]])
        result.append(inserts[k])
        start = positions[k]
    result.extend(units[start:])
    return result


def _nearest_index(sorted_values: Sequence[float], value: float) -> int:
    i = bisect_left(sorted_values, value)
    if i == len(sorted_values) or (i > 0 and value - sorted_values[i - 1] <= sorted_values[i] - value):
        return i - 1
    return i


def generate_samples(task: Task, resources: EvalResources, length: int, count: int, seed: int) -> list[Sample]:
    """`count` samples of `task` with prompts of about `length` tokens, fully determined by the seed and
    the tokenizer. The seed key leaves out the length, so every length gets the same keys and depths."""
    samples = []
    guess = 16
    for index in range(count):
        context = BuildContext(resources, length, index, f"{seed}/{task.name}/{index}")

        def render(size: int) -> tuple[Draft, str]:
            draft = task.build(context, size)
            return draft, resources.format.render(draft.message, draft.answer_prefix)

        try:
            fitted = fit_to_length(render, resources.format.count_tokens, length, guess)
        except ValueError as e:
            raise ValueError(f"{task.name}: {e}") from e
        guess = max(fitted.size, 1)  # the next sample needs about the same size: one or two probes
        draft = fitted.value
        samples.append(Sample(task=task.name, length=length, index=index, prompt=fitted.prompt,
                              references=draft.references, depths=draft.depths, prompt_tokens=fitted.tokens,
                              max_new_tokens=task.max_new_tokens, metric=task.metric))
    return samples
