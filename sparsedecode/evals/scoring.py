"""Scores in [0, 1] of one prediction against its references: RULER's string matches, and a final-number
match for math answers."""
from __future__ import annotations

import re
from collections.abc import Callable

_CONTROL = re.compile(r"[\x00-\x1f]")
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
# the forms a worked solution states its result in, most explicit first
_FINAL_ANSWER_PATTERNS = (
    re.compile(r"\\boxed\{\s*\$?\s*(" + _NUMBER + r")"),
    re.compile(r"answer\s*(?:is|:|=)?\s*[:=]?\s*\**\s*\$?\s*(" + _NUMBER + r")", re.IGNORECASE),
    re.compile(r"####\s*\$?\s*(" + _NUMBER + r")"),
)


def clean_prediction(text: str) -> str:
    """RULER's post-processing: strip, and turn control characters into newlines."""
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """The share of references found in the prediction (case-insensitive): RULER's metric for most tasks."""
    found = prediction.lower()
    return sum(r.lower() in found for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 if any reference is in the prediction (case-insensitive): RULER's metric for QA."""
    found = prediction.lower()
    return float(any(r.lower() in found for r in references))


def extract_final_number(text: str) -> str | None:
    """The number a solution ends on: the last boxed / "answer is" / "####" number, else the last number."""
    for pattern in _FINAL_ANSWER_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return matches[-1]
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def number_match(prediction: str, references: list[str]) -> float:
    """1 if the prediction's final number equals a reference number (exact answer match for math)."""
    final = extract_final_number(prediction)
    value = _as_number(final) if final is not None else None
    return float(value is not None and any(_as_number(r) == value for r in references))


def numbered_answers(prediction: str, references: list[str]) -> float:
    """The share of references stated right as "Answer k: <number>" (k from 1, in order; the last statement
    of each k counts): the answers of a chain of problems in one generation."""
    correct = 0
    for k, reference in enumerate(references, 1):
        stated = re.findall(rf"answer\s*{k}\s*[:=]\s*\**\s*\$?\s*({_NUMBER})", prediction, re.IGNORECASE)
        value = _as_number(stated[-1]) if stated else None
        correct += value is not None and value == _as_number(reference)
    return correct / len(references)


METRICS: dict[str, Callable[[str, list[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "number_match": number_match,
    "numbered_answers": numbered_answers,
}


def score(metric: str, prediction: str, references: list[str]) -> float:
    return METRICS[metric](clean_prediction(prediction), references)
