"""Long reasoning: GSM-style word problems from reasoning-gym, answered with a long chain of thought.

Here the "length" of a sample is its generation budget (max new tokens): the KV cache grows while the model
reasons, which is what a sparse decode method has to survive.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsedecode.utils.files import atomic_write_text

from .samples import EvalResources, Sample

REASONING_DATASET = "gsm_symbolic"
INSTRUCTION = ("\n\nSolve the problem step by step. Then write the final answer, a number only, on the last line "
               "in the form \"Answer: <number>\".")


def load_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("the reasoning suite needs the reasoning-gym package: pip install reasoning-gym "
                          "(or pip install 'sparsedecode[eval]')") from e
    return reasoning_gym


def generate_problems(count: int, seed: int) -> list[dict[str, str]]:
    """`count` problems of the reasoning-gym dataset as {"question", "answer"}; the seed fixes them."""
    problems = load_reasoning_gym().create_dataset(REASONING_DATASET, size=count, seed=seed)
    return [{"question": problems[i]["question"], "answer": str(problems[i]["answer"])} for i in range(count)]


def write_problems(path: str | Path, problems: list[dict[str, str]]) -> None:
    """Problems as JSON Lines, for machines without reasoning-gym; replaced atomically."""
    atomic_write_text(path, "".join(json.dumps(problem) + "\n" for problem in problems))


def read_problems(path: str | Path, count: int) -> list[dict[str, str]]:
    """The first `count` problems of a JSON Lines file written by `write_problems`."""
    problems = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                problem = json.loads(line)
                problems.append({"question": str(problem["question"]), "answer": str(problem["answer"])})
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}, line {number}: expected a JSON object with \"question\" and "
                                 "\"answer\" (write the file with `sparsedecode eval export-problems`)") from None
    if len(problems) < count:
        raise ValueError(f"{path} holds {len(problems)} problems, fewer than the {count} samples asked for")
    return problems[:count]


def reasoning_samples(resources: EvalResources, budgets: list[int], count: int, seed: int,
                      problems_file: str | Path | None = None) -> list[Sample]:
    """`count` problems (the same ones for every budget): from `problems_file` when given, otherwise
    generated with reasoning-gym from the seed."""
    problems = read_problems(problems_file, count) if problems_file else generate_problems(count, seed)
    samples = []
    for budget in budgets:
        for index in range(count):
            problem = problems[index]
            prompt = resources.format.render(problem["question"] + INSTRUCTION)
            samples.append(Sample(task=REASONING_DATASET, length=budget, index=index, prompt=prompt,
                                  references=[str(problem["answer"])], depths=[],
                                  prompt_tokens=resources.format.count_tokens(prompt), max_new_tokens=budget,
                                  metric="number_match"))
    return samples
