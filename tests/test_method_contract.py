"""The contract every registered decode method inherits: a budget covering the context reproduces dense
decoding token for token, in ragged batches and for sequences that join a running batch; a small budget
reads less than dense; several decode steps per host synchronisation decode as one step each; on a GPU,
graph replays decode as eager steps do."""
from __future__ import annotations

import pytest
import torch

from sparsedecode import LLM, SamplingParams
from sparsedecode.methods import METHODS

CONTEXT = 512
PROMPTS = [[(13 * i + 7 * n) % 500 + 1 for i in range(n)] for n in (45, 130, 301)]  # not multiples of a block
NEW_TOKENS = 8


def covering(name: str) -> dict:
    """Options under which the method reads every cached token."""
    return {"budget": CONTEXT} if "budget" in METHODS[name].defaults else {}


@pytest.fixture(scope="module")
def tiny() -> LLM:
    torch.manual_seed(0)
    return LLM("random:tiny-llama", device="cpu", block_size=16, max_context=CONTEXT, prefill_chunk=64,
               max_num_seqs=4)


@pytest.fixture(scope="module")
def alone(tiny: LLM) -> list[list[int]]:
    tiny.use_method("dense")
    return [tiny.generate([p], max_new_tokens=NEW_TOKENS, stop_token_ids=[])[0].token_ids for p in PROMPTS]


def staggered(llm: LLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens of requests that arrive one engine step apart (each joins a running batch)."""
    engine, tokens = llm.engine, {}
    ids = []
    for prompt in prompts:
        ids.append(engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True)))
        for out in engine.step():
            tokens[out.request_id] = out.token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = out.token_ids
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_covering_budget_equals_dense_in_a_ragged_batch(name: str, tiny: LLM, alone: list[list[int]]) -> None:
    tiny.use_method(name, **covering(name))
    together = tiny.generate(PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert [g.token_ids for g in together] == alone


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_sequence_joining_mid_batch_decodes_as_alone(name: str, tiny: LLM, alone: list[list[int]]) -> None:
    tiny.use_method(name, **covering(name))
    assert staggered(tiny, PROMPTS, NEW_TOKENS) == alone
    assert tiny.engine.stats()["blocks_used"] == 0


@pytest.mark.parametrize("name", sorted(n for n in METHODS if "budget" in METHODS[n].defaults))
def test_a_small_budget_reads_less_than_dense(name: str, tiny: LLM) -> None:
    tiny.use_method(name, budget=64)
    generation = tiny.generate([PROMPTS[-1]], max_new_tokens=NEW_TOKENS, stop_token_ids=[])[0]
    assert 0 < generation.kv_fraction_read < 1
    assert generation.kv_bytes_per_token > 0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_several_steps_per_sync_decode_as_one_step_per_sync(name: str, tiny: LLM) -> None:
    """`generate(sync_every=k)` runs k decode steps per host synchronisation (a GPU's default): with a
    sparse budget, whose per-sequence step clocks and selections the steps advance, the tokens are those
    of one step per synchronisation."""
    tiny.use_method(name, **({"budget": 64} if "budget" in METHODS[name].defaults else {}))
    runs = [[g.token_ids for g in tiny.generate(PROMPTS, max_new_tokens=NEW_TOKENS + 3, stop_token_ids=[],
                                                sync_every=k)] for k in (1, 5)]
    assert runs[0] == runs[1] and all(len(t) == NEW_TOKENS + 3 for t in runs[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", sorted(METHODS))
def test_graph_replay_equals_eager_on_gpu(name: str) -> None:
    tokens = []
    for graphs in (False, True):
        torch.manual_seed(0)
        llm = LLM("random:tiny-llama", device="cuda", dtype=torch.float32, block_size=16, max_context=CONTEXT,
                  cuda_graphs=graphs, compile_decode=False, max_num_seqs=4, method=name, **covering(name))
        tokens.append(staggered(llm, PROMPTS, NEW_TOKENS))
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("name", sorted(n for n in METHODS if "budget" in METHODS[n].defaults))
def test_a_sparse_sequence_joining_mid_batch_decodes_as_alone(name: str, tiny: LLM) -> None:
    """Per-sequence method state (selections, LFPS history, Quest bounds, step clocks) follows its slot and
    is reset when the slot is reused: at a budget reading a fraction of the context, a sequence decodes the
    same alone, in a batch it joins late, and in a slot another sequence used before."""
    tiny.use_method(name, budget=64)
    alone = [tiny.generate([p], max_new_tokens=NEW_TOKENS, stop_token_ids=[])[0].token_ids for p in PROMPTS]
    assert staggered(tiny, PROMPTS, NEW_TOKENS) == alone
    assert staggered(tiny, PROMPTS[::-1], NEW_TOKENS) == alone[::-1]  # each in another slot, after another


def observed_reads(llm: LLM, prompt: list[int], new_tokens: int) -> tuple[float, float, float]:
    """(rows the method reported, rows its attention calls visited, dense rows) of one greedy generation:
    rows are (token, KV head, layer) K/V rows, over the decode steps."""
    from sparsedecode.kernels.reference import visible_tokens
    from sparsedecode.kernels.sparse_decode import record_attention_reads

    visited = 0.0

    def count(q, k, v, seq_lens, scale, unit_size, unit_lists, unit_counts, full_rows) -> None:
        nonlocal visited
        live = seq_lens > 1  # rows of idle slots have length 1
        read = visible_tokens(seq_lens, k.shape[2], unit_size, unit_lists, unit_counts, full_rows, k.shape[1])
        visited += float(read[live].sum())

    with record_attention_reads(count):
        generation = llm.generate([prompt], max_new_tokens=new_tokens, stop_token_ids=[])[0]
    c = llm.config
    dense = sum(c.num_layers * c.num_kv_heads * (len(prompt) + s) for s in range(1, new_tokens))
    return generation.kv_fraction_read * dense, visited, dense


@pytest.mark.parametrize("prompt_length", [37, 301])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_kv_count_is_what_the_attention_reads(name: str, prompt_length: int, tiny: LLM) -> None:
    """The reported KV fraction counts the rows the attention op visits: exactly where the lists' lengths
    are known on the host, and never less where they depend on the data (LFPS candidate lists, counted
    at their longest). Quest also reads its page bounds (two keys' worth per page): its count adds them,
    so a budget covering a short prompt reads more than dense."""
    tiny.use_method(name, **({"budget": 64} if "budget" in METHODS[name].defaults else {}))
    prompt = PROMPTS[-1][:prompt_length]
    reported, visited, dense = observed_reads(tiny, prompt, NEW_TOKENS)
    if name == "quest":
        o, c = tiny.method.options, tiny.config
        sparse_layers = c.num_layers - min(o["dense_layers"], c.num_layers)
        visited += sum(sparse_layers * c.num_kv_heads * -(-(len(prompt) + s) // o["page_size"])
                       for s in range(1, NEW_TOKENS))
    if name in ("lfps", "lychee+lfps"):
        assert visited <= reported + 1e-6 and reported <= dense * 1.0001
    else:
        assert reported == pytest.approx(visited, rel=1e-9)


def test_a_method_sees_the_last_prompt_queries_across_prefill_chunks(tiny: LLM) -> None:
    """A SnapKV-like method fits in one class: `prompt_queries` asks for the prompt's last queries, which
    `after_prefill` receives per layer, however the prefill was chunked."""
    from sparsedecode.methods.dense import Dense

    class Observer(Dense):
        name = "observer"
        prompt_queries = 5

        def after_prefill(self, layer, pool, blocks, length, queries=None):
            seen[layer] = queries.clone()

    prompt = PROMPTS[-1][:258]  # chunks of 64, the last of 2: the 5 queries span two chunks
    seen: dict[int, torch.Tensor] = {}
    expected: dict[int, torch.Tensor] = {}

    def attention(layer, q, k, v):  # one dense pass over the whole prompt
        expected[layer] = q[-5:].clone()
        from sparsedecode.models.transformer import prefill_attention
        return prefill_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)

    tiny.model.forward(torch.tensor(prompt), torch.arange(len(prompt)), attention)
    tiny.engine.use_method(Observer(tiny.config))
    tiny.generate([prompt], max_new_tokens=2, stop_token_ids=[])
    assert sorted(seen) == list(range(tiny.config.num_layers))
    for layer in seen:
        assert seen[layer].shape == (5, tiny.config.num_heads, tiny.config.head_dim)
        torch.testing.assert_close(seen[layer], expected[layer], rtol=1e-4, atol=1e-4)
    tiny.use_method("dense")
