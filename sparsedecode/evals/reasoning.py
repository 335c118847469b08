"""Long reasoning: GSM-style word problems from reasoning-gym, answered with a long chain of thought.

Here the "length" of a sample is its generation budget (max new tokens): the KV cache grows while the model
reasons, which is what a sparse decode method has to survive. A prompt may chain several problems
(`problems_per_prompt`): the model then solves them one after another in one answer, each stated as
"Answer k: <number>", so the generation is as long as the chain and later solutions must look back at their
problem at the start of the cache.
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
# Asked only to reason before each answer, the registry's models wrote every "Answer k:" line first and a bare
# equation after it; a heading per problem and the order spelled out make them reason (notes/2026-12-01-gpu-runs.md).
CHAIN_INSTRUCTION = ("Solve the {count} problems below, one after another, in order. For each problem k, first "
                     "write a heading line \"Problem k\", then work it out step by step in full sentences, and "
                     "only after the reasoning write its final answer, a number only, on its own line in the form "
                     "\"Answer k: <number>\". Do not write any answer before its reasoning.")


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
        raise ValueError(f"{path} holds {len(problems)} problems, fewer than the {count} asked for (--samples "
                         "times --problems-per-prompt); export more with `sparsedecode eval export-problems`")
    return problems[:count]


def reasoning_task(problems_per_prompt: int) -> str:
    """The task name of prompts with this many problems (the dataset's name for one)."""
    return REASONING_DATASET if problems_per_prompt == 1 else f"{REASONING_DATASET}_x{problems_per_prompt}"


def chained_message(problems: list[dict[str, str]]) -> str:
    """One user message asking for every problem in order, each answered as "Answer k: <number>"."""
    questions = "".join(f"\n\nProblem {k}: {problem['question']}" for k, problem in enumerate(problems, 1))
    return CHAIN_INSTRUCTION.format(count=len(problems)) + questions


def reasoning_samples(resources: EvalResources, budgets: list[int], count: int, seed: int,
                      problems_file: str | Path | None = None, problems_per_prompt: int = 1) -> list[Sample]:
    """`count` prompts of `problems_per_prompt` consecutive problems each (the same ones for every budget):
    from `problems_file` when given, otherwise generated with reasoning-gym from the seed."""
    if problems_per_prompt < 1:
        raise ValueError(f"problems_per_prompt must be at least 1, not {problems_per_prompt}")
    needed = count * problems_per_prompt
    problems = read_problems(problems_file, needed) if problems_file else generate_problems(needed, seed)
    task = reasoning_task(problems_per_prompt)
    samples = []
    for budget in budgets:
        for index in range(count):
            chain = problems[index * problems_per_prompt:(index + 1) * problems_per_prompt]
            if problems_per_prompt == 1:
                message, metric = chain[0]["question"] + INSTRUCTION, "number_match"
            else:
                message, metric = chained_message(chain), "numbered_answers"
            prompt = resources.format.render(message)
            samples.append(Sample(task=task, length=budget, index=index, prompt=prompt,
                                  references=[str(problem["answer"]) for problem in chain], depths=[],
                                  prompt_tokens=resources.format.count_tokens(prompt), max_new_tokens=budget,
                                  metric=metric))
    return samples
