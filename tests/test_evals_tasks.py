"""The eval task generators: length fit, needle placement, scoring, determinism."""
from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from sparsedecode.evals import (RULER_TASKS, EvalResources, build_samples, extract_final_number, generate_samples,
                                length_tolerance, needle_samples, number_match, score, string_match_all,
                                string_match_part)
from sparsedecode.evals.ruler import load_qa_sets
from sparsedecode.evals.samples import fit_to_length, insert_at_depths
from test_evals_support import smollm2_tokenizer, write_hotpotqa, write_squad

LENGTHS = (2048, 16384)


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    qa_sets = load_qa_sets(write_squad(folder / "squad.json"), write_hotpotqa(folder / "hotpot.json"))
    return EvalResources(smollm2_tokenizer(), qa_sets=qa_sets)


@pytest.fixture(scope="module")
def generated(resources):
    """Two samples of every task at each length, built once for the tests below."""
    return {(name, length): generate_samples(task, resources, length, 2, seed=7)
            for name, task in RULER_TASKS.items() for length in LENGTHS}


# where the haystack of each kind of prompt starts and ends (after any worked example)
SPAN_MARKERS = {
    "niah": ("afterwards.\n", "\nWhat "),
    "needle": ("afterwards.\n", "\nWhat "),
    "vt": ("in the following text.\n\n", "\nQuestion: Find all"),
    "qa": ("The following are given documents.\n\n", "\n\nAnswer the question based"),
}


def answer_depths(task: str, prompt: str, references: list[str]) -> list[float]:
    """Where each reference sits in the prompt's haystack, as a share of the haystack's characters."""
    start_marker, end_marker = SPAN_MARKERS[task.split("_")[0]]
    start = prompt.rindex(start_marker) + len(start_marker)
    end = prompt.rindex(end_marker)
    if task == "vt":
        positions = [prompt.index(f"VAR {name} = ", start) for name in references]
    elif task.startswith("qa"):
        positions = [prompt.index(references[0], start)]
    else:
        positions = [prompt.index(f" is: {value}.", start) for value in references]
    assert all(start <= p < end for p in positions)
    return [(p - start) / (end - start) for p in positions]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_prompt_hits_target_length(generated, resources, task, length):
    for sample in generated[(task, length)]:
        tokens = resources.format.count_tokens(sample.prompt)
        assert tokens == sample.prompt_tokens
        assert length - length_tolerance(length) <= tokens <= length, (task, length, tokens)
        assert sample.prompt.startswith("<|im_start|>")  # the chat template was applied
        assert sample.length == length and sample.max_new_tokens == RULER_TASKS[task].max_new_tokens


@pytest.mark.parametrize("task", [t for t in RULER_TASKS if t not in ("cwe", "fwe")])
def test_answers_sit_at_their_stated_depths(generated, task):
    for sample in generated[(task, 16384)]:
        actual = answer_depths(task, sample.prompt, sample.references)
        if task.startswith("qa"):  # depths are those of the gold documents; the answer is in one of them
            assert len(sample.depths) == {"qa_1": 1, "qa_2": 2}[task]
            assert any(actual[0] == pytest.approx(d, abs=0.03) for d in sample.depths)
        else:
            assert actual == pytest.approx(sample.depths, abs=0.03), task


def test_needles_follow_ruler_definitions(generated):
    def sample(task):
        return generated[(task, 16384)][0]

    assert sample("niah_single_1").prompt.count("The grass is green. The sky is blue.") > 100
    assert re.fullmatch(r"\d{7}", sample("niah_single_2").references[0])
    assert re.fullmatch(r"[0-9a-f-]{36}", sample("niah_single_3").references[0])
    assert sample("niah_multikey_1").prompt.count("One of the special magic numbers for") == 4
    assert sample("niah_multikey_2").prompt.count("One of the special magic numbers for") > 100
    multikey_3 = sample("niah_multikey_3").prompt
    assert multikey_3.count("One of the special magic uuids for") > 100
    assert re.search(r"What is the special magic uuid for [0-9a-f-]{36} mentioned", multikey_3)
    assert len(sample("niah_multivalue").references) == 4
    assert len(sample("niah_multiquery").references) == 4
    assert "What are all the special magic numbers for" in sample("niah_multiquery").prompt
    vt = sample("vt")
    assert len(vt.references) == 5 and vt.prompt.count("Memorize and track") == 2  # worked example + question
    assert f"VAR {vt.references[0]} = " in vt.prompt


def test_common_words_are_the_most_common(generated):
    sample = generated[("cwe", 16384)][0]
    question = sample.prompt[sample.prompt.rindex("Below is a numbered list"):]
    counts = Counter(re.findall(r"\d+\. (\S+)", question))
    assert {w for w, _ in counts.most_common(10)} == set(sample.references)
    assert all(counts[w] == 30 for w in sample.references)
    assert max(c for w, c in counts.items() if w not in sample.references) == 3


def test_frequent_words_are_the_most_frequent(generated):
    sample = generated[("fwe", 16384)][0]
    text = sample.prompt[sample.prompt.index("coded words. ") + 13:sample.prompt.index("\nQuestion:")]
    ranked = [w for w, _ in Counter(text.split()).most_common(4)]
    assert ranked == ["...", *sample.references]


@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_scorer_rewards_the_reference_only(generated, task):
    sample = generated[(task, 2048)][0]
    assert score(sample.metric, " " + ", ".join(sample.references) + "\n", sample.references) == 1.0
    assert score(sample.metric, "I could not find it.", sample.references) == 0.0


def test_ruler_metrics():
    assert string_match_all("Alpha and BETA", ["alpha", "beta", "gamma", "delta"]) == 0.5
    assert string_match_part("it is Paris", ["London", "paris"]) == 1.0
    assert string_match_part("it is Rome", ["London", "paris"]) == 0.0


@pytest.mark.parametrize("text, number", [
    ("3 + 4 = 7, so 7 * 2 = 14.\nAnswer: 14", "14"),
    ("The answer is $1,250.", "1,250"),
    ("so \\boxed{42} is it. Check: 6*7", "42"),
    ("#### -3", "-3"),
    ("First 12, then 18.5", "18.5"),
    ("no digits", None),
])
def test_final_number_extraction(text, number):
    assert extract_final_number(text) == number


def test_number_match():
    assert number_match("Answer: 1,250", ["1250"]) == 1.0
    assert number_match("Answer: 1250.0", ["1250"]) == 1.0
    assert number_match("Answer: 125", ["1250"]) == 0.0


def test_numbered_answers_score_each_problem_of_a_chain():
    references = ["12", "7", "1250"]
    assert score("numbered_answers", "...\nAnswer 1: 12\n...\nAnswer 2: 7\n...\nAnswer 3: 1,250", references) == 1.0
    assert score("numbered_answers", "Answer 1: 12\nAnswer 2: 8\nAnswer 3: 1250.0", references) == pytest.approx(2 / 3)
    assert score("numbered_answers", "Answer 1: 12\nAnswer 3: 1250", references) == pytest.approx(2 / 3)  # 2 unstated
    assert score("numbered_answers", "answer 2 = 99\nAnswer 2: 7", references) == pytest.approx(1 / 3)  # the last counts
    # "Answer 12" is not problem 1's answer, and a bare final number is no numbered answer
    assert score("numbered_answers", "Answer 12: 12\nso 7", ["12", "7"]) == 0.0


def test_same_seed_gives_same_prompts_and_another_seed_others(tmp_path):
    tokenizer = smollm2_tokenizer()

    def prompts(seed):
        samples, _ = build_samples("ruler", tokenizer, [1024, 2048], 2, seed, tasks=["niah_multikey_2", "vt", "fwe"])
        return [s.prompt for s in samples]

    first = prompts(3)
    assert prompts(3) == first  # fresh resources, same prompts
    assert prompts(4) != first


def test_qa_is_skipped_without_files():
    samples, skipped = build_samples("ruler", smollm2_tokenizer(), [1024], 1, 0, tasks=["qa_1", "qa_2", "vt"])
    assert {s.task for s in samples} == {"vt"}
    assert "SQuAD" in skipped["qa_1"] and "HotpotQA" in skipped["qa_2"]


def test_needle_grid_places_the_needle_at_each_depth(resources):
    samples = needle_samples(resources, [4096], [0.0, 0.5, 1.0], 2, seed=1)
    assert [(s.depths, s.index) for s in samples] == [([d], i) for d in (0.0, 0.5, 1.0) for i in (0, 1)]
    for s in samples:
        assert answer_depths("needle", s.prompt, s.references) == pytest.approx(s.depths, abs=0.03)
    # sample i carries the same number at every depth, so depths are compared on equal footing
    assert samples[0].references == samples[2].references == samples[4].references


def test_32k_prompts_build_fast(resources):
    start = time.perf_counter()
    samples = generate_samples(RULER_TASKS["niah_multivalue"], resources, 32768, 3, seed=0)
    assert time.perf_counter() - start < 5
    assert all(32768 - length_tolerance(32768) <= s.prompt_tokens <= 32768 for s in samples)


def test_too_short_target_is_refused(resources):
    with pytest.raises(ValueError, match="vt: a prompt of 200 tokens is not possible"):
        generate_samples(RULER_TASKS["vt"], resources, 200, 1, seed=0)


def test_fit_to_length_on_a_linear_count():
    fitted = fit_to_length(lambda n: (n, "x" * n), lambda text: 100 + 3 * len(text), 10_000)
    assert 10_000 - length_tolerance(10_000) <= fitted.tokens <= 10_000


def test_insert_at_depths_keeps_order_and_places_by_characters():
    units = ["aaaa"] * 9
    placed = insert_at_depths(units, ["X", "Y", "Z"], [0.0, 0.5, 1.0])
    assert placed == ["X", *["aaaa"] * 4, "Y", *["aaaa"] * 5, "Z"]  # 0.5 falls between units 4 and 5: the first
    assert insert_at_depths(units, ["P", "Q"], [0.3, 0.3]) == [*["aaaa"] * 3, "P", "Q", *["aaaa"] * 6]


def test_reasoning_samples_are_gsm_problems():
    pytest.importorskip("reasoning_gym")
    samples, _ = build_samples("reasoning", smollm2_tokenizer(), [512, 1024], 2, seed=5)
    assert [(s.length, s.max_new_tokens, s.index) for s in samples] == [(512, 512, 0), (512, 512, 1),
                                                                          (1024, 1024, 0), (1024, 1024, 1)]
    assert samples[0].prompt == samples[2].prompt and samples[0].metric == "number_match"
    assert "Answer: <number>" in samples[0].prompt
    reference = samples[0].references[0]
    assert number_match(f"Let me think... so the result is\nAnswer: {reference}", [reference]) == 1.0

    chained, _ = build_samples("reasoning", smollm2_tokenizer(), [512], 2, seed=5, problems_per_prompt=3)
    single, _ = build_samples("reasoning", smollm2_tokenizer(), [512], 6, seed=5)
    assert [s.task for s in chained] == ["gsm_symbolic_x3"] * 2 and chained[0].metric == "numbered_answers"
    assert [s.references for s in chained] == [[s.references[0] for s in single[:3]],
                                              [s.references[0] for s in single[3:]]]
    assert '"Answer k: <number>"' in chained[1].prompt and "Problem 3:" in chained[1].prompt
    assert chained[1].prompt.index('heading line "Problem k"') < chained[1].prompt.index("Problem 1:")
    starts = [chained[1].prompt.index(f"Problem {k}:") for k in (1, 2, 3)]
    assert starts == sorted(starts) and "Problem 4:" not in chained[1].prompt
    assert chained[1].prompt_tokens > max(s.prompt_tokens for s in single[3:])
