"""Continuous batching on real weights: requests added at different steps through `llm.engine` decode the
tokens `llm.generate` gives each alone, for every method at a budget covering the context; chunked
prefill, preemption and prefix caching change no token; aborts free their blocks."""
from __future__ import annotations

import pytest

from sparsedecode import LLM, SamplingParams
from sparsedecode.methods import METHODS

from test_method_contract import covering, staggered

pytestmark = pytest.mark.slow  # real model weights

CONTEXT = 512
NEW_TOKENS = 8


def prompts_for(llm: LLM) -> list[list[int]]:
    text = ("The old lighthouse keeper counted the ships every night, writing their names in a ledger "
            "that nobody else was allowed to read. ")
    ids = llm.tokenizer(text * 24).input_ids
    # Lengths not multiples of the block of 16; different starts, so no prompt shares another's blocks.
    return [ids[:37], ids[40:190], ids[100:401]]


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen2.5-coder-0.5b"])
def model(request) -> tuple[LLM, list[list[int]], list[list[int]]]:
    llm = LLM(request.param, device="cpu", block_size=16, max_context=CONTEXT, prefill_chunk=64, max_num_seqs=4)
    prompts = prompts_for(llm)
    alone = [llm.generate([p], max_new_tokens=NEW_TOKENS, stop_token_ids=[])[0].token_ids for p in prompts]
    return llm, prompts, alone


@pytest.mark.parametrize("name", sorted(METHODS))
def test_requests_joining_at_different_steps_decode_as_alone(name: str, model) -> None:
    llm, prompts, alone = model
    llm.use_method(name, **covering(name))
    assert staggered(llm, prompts, NEW_TOKENS) == alone
    assert llm.engine.stats()["blocks_used"] == 0


@pytest.mark.parametrize("model", ["smollm2-135m"], indirect=True)  # the scheduler's logic: one model is enough
def test_preemption_and_resume_give_the_same_tokens(model) -> None:
    llm, prompts, _ = model
    lengths = [40, 40, NEW_TOKENS]
    llm.use_method("dense")
    alone = [llm.generate([p], max_new_tokens=n, stop_token_ids=[])[0].token_ids for p, n in zip(prompts, lengths)]
    # 32 usable blocks hold the three prompts (3 + 10 + 19 blocks) but not the older ones' growth: the newest
    # is preempted, then recomputed (prompt and output so far) once blocks are free again.
    small = LLM(llm.model_spec, device="cpu", block_size=16, max_context=CONTEXT, prefill_chunk=64, max_num_seqs=4,
                num_blocks=33)
    engine, tokens = small.engine, {}
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = out.token_ids
    assert [tokens[i] for i in ids] == alone
    assert engine.stats()["preemptions"] > 0 and engine.stats()["blocks_used"] == 0


def test_prefix_cache_reuses_blocks_without_changing_tokens(model) -> None:
    llm, prompts, alone = model
    llm.use_method("dense")
    first = llm.generate([prompts[2]], max_new_tokens=NEW_TOKENS, stop_token_ids=[])[0]
    again = llm.generate([prompts[2]], max_new_tokens=NEW_TOKENS, stop_token_ids=[])[0]
    assert again.prefill_reused and again.cached_prompt_tokens == 288  # the full blocks before the last token's
    assert first.token_ids == again.token_ids == alone[2]


def test_abort_frees_blocks_at_once(model) -> None:
    llm, prompts, _ = model
    engine = llm.engine
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in prompts]
    for _ in range(3):
        engine.step()
    assert engine.stats()["blocks_used"] > 0
    for request_id in ids:
        engine.abort(request_id)
    assert engine.stats() | {"preemptions": 0} == {
        "running": 0, "waiting": 0, "blocks_used": 0, "blocks_free": engine.block_manager.num_usable_blocks,
        "blocks_total": engine.block_manager.num_usable_blocks, "block_size": 16, "preemptions": 0}
    assert not engine.has_unfinished_requests()


def test_engine_refuses_bad_requests(model) -> None:
    llm, prompts, _ = model
    engine = llm.engine
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        engine.add_request(prompts[2], SamplingParams(max_tokens=300))
    with pytest.raises(ValueError, match="max_tokens must be an integer of at least 1"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    # values the step's parameter tensors cannot hold would fail every request of the batch: refused here
    with pytest.raises(ValueError, match="seed must be a 64-bit integer"):
        SamplingParams(seed=2**63)
    with pytest.raises(ValueError, match="top_k must be an integer from 0"):
        SamplingParams(top_k=2**64)
    for temperature in (float("inf"), float("nan"), -0.5):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            SamplingParams(temperature=temperature)
    assert SamplingParams(seed=-(2**63), top_k=2**63 - 1).seed == -(2**63)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, not 'hot'"):
        SamplingParams(temperature="hot")
    with pytest.raises(ValueError, match="top_p must be a number in"):
        SamplingParams(top_p=None)
    with pytest.raises(ValueError, match="a prompt is text or a list of token ids, not NoneType"):
        engine.add_request(None, SamplingParams())
    with pytest.raises(ValueError, match="per-request method options"):
        engine.add_request(prompts[0], SamplingParams(), method_options={"budget": 128})
    with pytest.raises(ValueError, match="token ids must be integers"):
        engine.add_request([1, -5], SamplingParams())
    rid = engine.add_request(prompts[0], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(prompts[0], SamplingParams(), request_id=rid)
    engine.abort(rid)
    assert not engine.has_unfinished_requests()
