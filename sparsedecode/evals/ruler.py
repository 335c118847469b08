"""RULER's synthetic tasks (NVIDIA/RULER `scripts/synthetic.yaml`), generated offline at a target token length.

Prompts, needles and answer prefixes follow RULER's task definitions; RULER's answer prefix opens the
assistant turn. Depths are drawn from RULER's 40-point grid.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .qa import QaSet, read_hotpotqa, read_squad
from .samples import DEPTH_GRID, BuildContext, Draft, EvalResources, Sample, Task, generate_samples, insert_at_depths
from .words import COMPOUND_WORDS, VALUE_MAKERS, draw_unique

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {value_kind} for {key} is: {value}."


@dataclass(frozen=True)
class NiahSpec:
    haystack: str  # "noise", "essay" or "needle" (the haystack is distractor needles)
    key_kind: str  # a VALUE_MAKERS name
    value_kind: str
    num_keys: int = 1
    num_values: int = 1  # values per key
    num_queries: int = 1  # keys asked for
    depths: tuple[float, ...] | None = None  # fixed needle depths (the needle grid); RULER draws them


NIAH_SPECS: dict[str, NiahSpec] = {
    "niah_single_1": NiahSpec("noise", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": NiahSpec("needle", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needle", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", num_values=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", num_queries=4),
}


def _filler(kind: str, context: BuildContext, size: int) -> tuple[list[str], str]:
    """`size` haystack units and the separator that joins them."""
    if kind == "noise":
        return [NOISE] * size, "\n"
    if kind == "essay":
        return context.resources.essays.units(size), " "
    raise ValueError(f"unknown haystack kind {kind!r}")


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def build_niah(spec: NiahSpec, context: BuildContext, size: int) -> Draft:
    rng = context.rng()
    make_key, make_value = VALUE_MAKERS[spec.key_kind], VALUE_MAKERS[spec.value_kind]
    keys = draw_unique(lambda: make_key(rng), max(spec.num_keys, spec.num_queries))
    values = draw_unique(lambda: make_value(rng), len(keys) * spec.num_values)
    values_of = {key: values[k * spec.num_values:(k + 1) * spec.num_values] for k, key in enumerate(keys)}
    pairs = [(key, value) for key in keys for value in values_of[key]]
    rng.shuffle(pairs)
    if spec.depths is not None and len(spec.depths) != len(pairs):
        raise ValueError(f"{len(spec.depths)} depths given for {len(pairs)} needles")
    depths = list(spec.depths) if spec.depths is not None else sorted(rng.sample(DEPTH_GRID, len(pairs)))
    queried = [keys[i] for i in rng.sample(range(len(keys)), spec.num_queries)]
    # drawn last, so the needles above do not change with the haystack size
    if spec.haystack == "needle":
        units, separator = [_distractor_needle(rng, spec, keys) for _ in range(size)], "\n"
    else:
        units, separator = _filler(spec.haystack, context, size)
    needles = [NEEDLE.format(value_kind=spec.value_kind, key=key, value=value) for key, value in pairs]
    text = separator.join(insert_at_depths(units, needles, depths))

    depth_of = {value: depth for (_, value), depth in zip(pairs, depths)}
    answers = [value for key in queried for value in values_of[key]]
    single = len(answers) == 1
    noun = spec.value_kind[:-1] if single else spec.value_kind
    verb = "is" if single else "are"
    query = _join_keys(queried)
    message = (f"{'A' if single else 'Some'} special magic {noun} {verb} hidden within the following text. "
               f"Make sure to memorize it. I will quiz you about the {noun} afterwards.\n{text}\n"
               f"What {'is' if single else 'are all'} the special magic {noun} for {query} mentioned in the "
               f"provided text?")
    prefix = f"The special magic {noun} for {query} mentioned in the provided text {verb}"
    return Draft(message, prefix, answers, [depth_of[a] for a in answers])


def _distractor_needle(rng: random.Random, spec: NiahSpec, keys: list[str]) -> str:
    key = VALUE_MAKERS[spec.key_kind](rng)
    while key in keys:
        key = VALUE_MAKERS[spec.key_kind](rng)
    return NEEDLE.format(value_kind=spec.value_kind, key=key, value=VALUE_MAKERS[spec.value_kind](rng))


# -- variable tracking -------------------------------------------------------------------------------
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
               "{context}\nQuestion: Find all variables that are assigned the value {value} in the text above.")
VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {count} variables "
             "are assigned the value {value}, they are:")
VT_HOPS = 4
VT_EXAMPLE_NOISE = 12  # noise lines of the worked example that precedes the question (~400 tokens, as RULER's)


def _variable_chain(rng: random.Random, units: list[str], separator: str) -> tuple[str, str, list[str], list[float]]:
    """One chain of VT_HOPS assignments hidden in `units`: (question, answer prefix, variables, depths)."""
    names = draw_unique(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), VT_HOPS + 1)
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}", *(f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:]))]
    depths = sorted(rng.sample(DEPTH_GRID, len(statements)))  # sorted: the chain reads in order
    context = separator.join(insert_at_depths(units, statements, depths))
    return (VT_TEMPLATE.format(context=context, value=value), VT_PREFIX.format(count=len(names), value=value),
            names, depths)


def build_variable_tracking(context: BuildContext, size: int) -> Draft:
    rng = context.rng()
    example, example_prefix, example_names, _ = _variable_chain(rng, [NOISE] * VT_EXAMPLE_NOISE, "\n")
    question, prefix, names, depths = _variable_chain(rng, *_filler("noise", context, size))
    message = f"{example} {example_prefix} {' '.join(example_names)}\n\n{question}"
    return Draft(message, prefix, names, depths)


# -- common words extraction -------------------------------------------------------------------------
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
                "words in the above list?")
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
CWE_COMMON = 10
_TEMPLATE_WORDS = frozenset((CWE_TEMPLATE + CWE_PREFIX).lower().split())


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i}. {word}" for i, word in enumerate(words, 1))


def _word_list(rng: random.Random, words: list[str], common_repeats: int, rare_repeats: int) -> str:
    entries = words[:CWE_COMMON] * common_repeats + words[CWE_COMMON:] * rare_repeats
    rng.shuffle(entries)
    return _numbered(entries)


def _distinct_words(rng: random.Random, vocabulary: list[str], count: int) -> list[str]:
    """Real words from the essays first, then adjective-noun compounds; the first k do not depend on `count`."""
    from_text = min(count, len(vocabulary) * 3 // 4)  # rejection sampling slows as the pool empties
    words = draw_unique(lambda: rng.choice(vocabulary), from_text)
    return words + draw_unique(lambda: rng.choice(COMPOUND_WORDS), count - from_text)


def build_common_words(context: BuildContext, size: int) -> Draft:
    """`size` rare words and 10 common ones; below 4K tokens RULER repeats them less."""
    rng = context.rng()
    short = context.length < 4096
    example_count, example_common, example_rare = (20, 3, 1) if short else (40, 10, 3)
    common_repeats, rare_repeats = (6, 1) if short else (30, 3)
    vocabulary = [w for w in context.resources.essays.vocabulary if w not in _TEMPLATE_WORDS]
    words = _distinct_words(rng, vocabulary, example_count + CWE_COMMON + size)
    example, words = words[:example_count], words[example_count:]
    shot = (CWE_TEMPLATE.format(context=_word_list(rng, example, example_common, example_rare))
            + f" {CWE_PREFIX} {_numbered(example[:CWE_COMMON])}")
    message = f"{shot}\n{CWE_TEMPLATE.format(context=_word_list(rng, words, common_repeats, rare_repeats))}"
    return Draft(message, CWE_PREFIX, words[:CWE_COMMON], [])


# -- frequent words extraction -----------------------------------------------------------------------
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                "text?")
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_ALPHA = 2.0
FWE_WORD_LETTERS = 6


def _zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta for alpha > 1: a partial sum plus the Euler-Maclaurin tail."""
    return sum(k ** -alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1) + terms ** -alpha / 2


def build_frequent_words(context: BuildContext, size: int) -> Draft:
    """Coded words with Zipf counts `size * rank^-alpha / zeta(alpha)`; the top one is '...' noise."""
    rng = context.rng()
    vocabulary = draw_unique(lambda: "".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LETTERS)),
                             max(context.length // 50, 5))
    vocabulary[0] = "..."
    norm = _zeta(FWE_ALPHA)
    words = [word for rank, word in enumerate(vocabulary, 1) for _ in range(int(size * rank ** -FWE_ALPHA / norm))]
    rng.shuffle(words)
    return Draft(FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, vocabulary[1:4], [])


# -- question answering ------------------------------------------------------------------------------
QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
               "the given documents. Only give me the answer and do not output any other words.\n\n"
               "Question: {query}")
QA_PREFIX = "Answer:"


def build_qa(dataset: str, context: BuildContext, size: int) -> Draft:
    """Question `index` of the set (in file order, as RULER) with its gold documents among `size` distractors."""
    qa = context.resources.qa_sets[dataset]
    question = qa.questions[context.index % len(qa.questions)]
    rng = context.rng()
    related = list(question.related)
    rng.shuffle(related)
    depths = sorted(rng.sample(DEPTH_GRID, len(question.gold)))
    taken = set(question.gold) | set(related)
    unique_others = min(max(size - len(related), 0), len(qa.documents) - len(taken))
    pool = related + draw_unique(lambda: rng.randrange(len(qa.documents)), unique_others, exclude=taken)
    # past the end of the set, go round it again (RULER repeats its documents too)
    distractors = [qa.documents[pool[i % len(pool)]] for i in range(size)] if pool else []
    documents = insert_at_depths(distractors, [qa.documents[i] for i in question.gold], depths)
    text = "\n\n".join(f"Document {n}:\n{document}" for n, document in enumerate(documents, 1))
    return Draft(QA_TEMPLATE.format(context=text, query=question.query), QA_PREFIX, question.answers, depths)


# -- the suite ---------------------------------------------------------------------------------------
NIAH_NEW_TOKENS = 128


def niah_task(name: str, spec: NiahSpec) -> Task:
    return Task(name, "string_match_all", NIAH_NEW_TOKENS, partial(build_niah, spec))


RULER_TASKS: dict[str, Task] = {
    **{name: niah_task(name, spec) for name, spec in NIAH_SPECS.items()},
    "vt": Task("vt", "string_match_all", 30, build_variable_tracking),
    "cwe": Task("cwe", "string_match_all", 120, build_common_words),
    "fwe": Task("fwe", "string_match_all", 50, build_frequent_words),
    "qa_1": Task("qa_1", "string_match_part", 32, partial(build_qa, "squad")),
    "qa_2": Task("qa_2", "string_match_part", 32, partial(build_qa, "hotpotqa")),
}
QA_DATASETS = {"qa_1": "squad", "qa_2": "hotpotqa"}
QA_READERS = {"squad": read_squad, "hotpotqa": read_hotpotqa}
QA_MISSING = {
    "squad": "no SQuAD v2 dev file given (--squad PATH to dev-v2.0.json)",
    "hotpotqa": "no HotpotQA dev file given (--hotpotqa PATH to hotpot_dev_distractor_v1.json)",
}


def load_qa_sets(squad: str | Path | None = None, hotpotqa: str | Path | None = None) -> dict[str, QaSet]:
    paths = {"squad": squad, "hotpotqa": hotpotqa}
    return {name: QA_READERS[name](path) for name, path in paths.items() if path is not None}


def ruler_samples(resources: EvalResources, lengths: list[int], count: int, seed: int,
                  tasks: list[str] | None = None) -> tuple[list[Sample], dict[str, str]]:
    """The samples of `tasks` (default: all) at every length, and the tasks skipped with the reason."""
    unknown = sorted(set(tasks or []) - set(RULER_TASKS))
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; tasks: {', '.join(RULER_TASKS)}")
    samples: list[Sample] = []
    skipped: dict[str, str] = {}
    for name in tasks or list(RULER_TASKS):
        dataset = QA_DATASETS.get(name)
        if dataset is not None and dataset not in resources.qa_sets:
            skipped[name] = QA_MISSING[dataset]
            continue
        for length in lengths:
            samples.extend(generate_samples(RULER_TASKS[name], resources, length, count, seed))
    return samples, skipped
