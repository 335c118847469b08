"""Long reasoning: GSM-style word problems from reasoning-gym, answered with a long chain of thought.

Here the "length" of a sample is its generation budget (max new tokens): the KV cache grows while the model
reasons, which is what a sparse decode method has to survive.
"""
from __future__ import annotations

from typing import Any

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


def reasoning_samples(resources: EvalResources, budgets: list[int], count: int, seed: int,
                      dataset: str = REASONING_DATASET) -> list[Sample]:
    """`count` problems of a reasoning-gym dataset (the same ones for every budget)."""
    problems = load_reasoning_gym().create_dataset(dataset, size=count, seed=seed)
    samples = []
    for budget in budgets:
        for index in range(count):
            problem = problems[index]
            prompt = resources.format.render(problem["question"] + INSTRUCTION)
            samples.append(Sample(task=dataset, length=budget, index=index, prompt=prompt,
                                  references=[str(problem["answer"])], depths=[],
                                  prompt_tokens=resources.format.count_tokens(prompt), max_new_tokens=budget,
                                  metric="number_match"))
    return samples
