"""Penalties, logit bias, min_tokens and min_p on the device against a token-by-token reference; sampling
without filters against the filtering path; the step's token choice through the engine."""
from __future__ import annotations

import random

import pytest
import torch

from sparsedecode import SamplingParams
from sparsedecode.engine import model_runner
from sparsedecode.engine.model_runner import token_choice
from sparsedecode.engine.sampling import Penalties, PenaltyRow, sample_tokens, sample_unfiltered


def reference(logits: list[float], row: PenaltyRow, prompt: list[int], output: list[int]) -> list[float]:
    """vLLM's order, one token at a time: bias, min_tokens, repetition, frequency and presence."""
    out = []
    for token, x in enumerate(logits):
        x += row.logit_bias.get(token, 0.0)
        if len(output) < row.min_tokens and token in row.stop_ids:
            x = float("-inf")
        if token in prompt or token in output:
            x = x / row.repetition if x > 0 else x * row.repetition
        count = output.count(token)
        out.append(x - row.frequency * count - row.presence * (count > 0))
    return out


def random_row(rng: random.Random, vocab: int) -> tuple[PenaltyRow, list[int], list[int]]:
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
    output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
    row = PenaltyRow(presence=rng.uniform(-2, 2), frequency=rng.uniform(-2, 2), repetition=rng.uniform(0.5, 2),
                     min_tokens=rng.randrange(0, 8), stop_ids=rng.sample(range(vocab), 2),
                     logit_bias={rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(3)})
    return row, prompt, output


@pytest.mark.parametrize("seed", range(5))
def test_apply_matches_the_reference_and_counting_equals_loading_the_history(seed: int) -> None:
    """Rows loaded with their history, decoded a few steps (each sampled token counted on the device), give
    the reference's logits of the grown history; an unpenalized row in a slot a penalized one left, and the
    idle rows, keep their logits."""
    rng = random.Random(seed)
    vocab, slots = rng.randrange(8, 40), 6
    penalties = Penalties(slots, vocab, torch.device("cpu"))
    leftover, *_ = random_row(rng, vocab)
    penalties.load([(3, PenaltyRow(**{**vars(leftover), "prompt_ids": [1], "output_ids": [2, 2]}))], slots)
    rows = {slot: random_row(rng, vocab) for slot in (0, 2, 4)}
    loaded = [(slot, PenaltyRow(**{**vars(row), "prompt_ids": prompt, "output_ids": list(output)}))
              for slot, (row, prompt, output) in rows.items()]
    size = 5
    penalties.load(loaded + [(3, None)], size)  # slot 3: a new, unpenalized sequence; slot 1 idle
    for _ in range(3):
        logits = torch.randn(size, vocab, dtype=torch.float32)
        got = penalties.apply(logits)
        for slot in range(size):
            if slot in rows:
                row, prompt, output = rows[slot]
                want = torch.tensor(reference(logits[slot].tolist(), row, prompt, output))
                torch.testing.assert_close(got[slot], want)
            else:
                assert torch.equal(got[slot], logits[slot])
        tokens = torch.randint(vocab, (size,))
        penalties.count(tokens)
        for slot, (_, _, output) in rows.items():
            output.append(int(tokens[slot]))
        later = [(slot, PenaltyRow(**vars(row))) for slot, (row, _, _) in rows.items()]  # no history: kept
        penalties.load(later, size)


def test_min_p_keeps_the_tokens_near_the_most_likely_one() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    args = (torch.full((64,), 1.0), torch.ones(64), torch.zeros(64, dtype=torch.int64),
            torch.arange(64), torch.arange(64))
    free = sample_tokens(logits, *args)
    kept = sample_tokens(logits, *args, min_p=torch.full((64,), 0.5))
    probs = logits.softmax(-1)
    chosen = probs.gather(1, kept[:, None]).squeeze(1)
    assert bool((chosen >= 0.5 * probs.max(-1).values).all())
    assert not bool((probs.gather(1, free[:, None]).squeeze(1) >= 0.5 * probs.max(-1).values).all())
    assert torch.equal(sample_tokens(logits, *args, min_p=torch.ones(64)), logits.argmax(-1))


@pytest.mark.parametrize("field,value,words", [
    ("presence_penalty", 2.5, "presence_penalty must be a number from -2 to 2"),
    ("frequency_penalty", "1", "frequency_penalty must be a number"),
    ("repetition_penalty", 0, "repetition_penalty must be a finite number > 0"),
    ("repetition_penalty", float("inf"), "repetition_penalty must be a finite number > 0"),
    ("min_p", 1.5, "min_p must be a number from 0 to 1"),
    ("min_tokens", 17, "min_tokens must be an integer from 0 to max_tokens (16)"),
    ("logit_bias", {-1: 1.0}, "logit_bias must map token ids"),
    ("logit_bias", {3: float("nan")}, "logit_bias must map token ids"),
])
def test_bad_values_are_refused_with_the_request(field: str, value: object, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**{field: value})
    good = {"min_tokens": 1, "logit_bias": {3: 0.5}}.get(field, 0.5)
    assert not SamplingParams().penalized and SamplingParams(**{field: good}).penalized


@pytest.mark.parametrize("vocab", [1000, 151_936])
def test_unfiltered_sampling_draws_the_filtering_paths_tokens(vocab: int) -> None:
    """Without top-k, top-p or min-p, Gumbel-max over the unsorted vocabulary picks what the sorted path picks,
    greedy rows (temperature 0) included."""
    gen = torch.Generator().manual_seed(vocab)
    rows = 48
    logits = torch.randn(rows, vocab, generator=gen) * torch.rand(rows, 1, generator=gen) * 8
    temperature = torch.rand(rows, generator=gen) * 2
    temperature[::5] = 0
    seeds, positions = torch.randint(0, 2**62, (rows,), generator=gen), torch.randint(0, 10**6, (rows,), generator=gen)
    want = sample_tokens(logits, temperature, torch.ones(rows), torch.zeros(rows, dtype=torch.int64), seeds, positions)
    got = sample_unfiltered(logits, temperature, seeds, positions)
    assert torch.equal(got, want)
    assert (got != logits.argmax(-1)).sum() > rows // 4  # the sampled rows do sample


def test_token_choice_takes_the_unfiltered_step_only_when_no_row_filters() -> None:
    row = lambda **kw: model_runner.DecodeRow(slot=0, token=1, position=5, step=0, block_table=[0], **kw)  # noqa: E731
    assert token_choice([row(), row()]) == "greedy"
    assert token_choice([row(), row(temperature=1.0)]) == "sampled"
    assert token_choice([row(top_k=5), row(temperature=1.0)]) == "sampled"  # the greedy row's top-k is moot
    for filtering in (dict(top_k=5), dict(top_p=0.9), dict(penalties=PenaltyRow(min_p=0.1))):
        assert token_choice([row(temperature=1.0), row(temperature=0.7, **filtering)]) == "filtered"


def test_the_engine_samples_unfiltered_rows_without_the_sort(monkeypatch) -> None:
    """A request at an API's defaults (temperature 1, nothing filtered) decodes through `sample_unfiltered`, and
    its tokens are those of the filtering path (checked at every step)."""
    from sparsedecode import LLM

    calls = []

    def checked(logits, temperature, seeds, positions):
        got = sample_unfiltered(logits, temperature, seeds, positions)
        rows = logits.shape[0]
        assert torch.equal(got, sample_tokens(logits, temperature, torch.ones(rows),
                                              torch.zeros(rows, dtype=torch.int64), seeds, positions))
        calls.append(rows)
        return got

    monkeypatch.setattr(model_runner, "sample_unfiltered", checked)
    llm = LLM("random:tiny-llama", device="cpu", block_size=16, max_context=256, max_num_seqs=4)
    out = llm.generate([[3, 4, 5], [6, 7]], max_new_tokens=6, temperature=1.0, seed=1, stop_token_ids=[])
    assert [len(g.token_ids) for g in out] == [6, 6] and len(calls) >= 5
