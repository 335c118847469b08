"""Quest on the engine: page bounds kept per physical pool block and up to date while decoding, exactness at
full budget, the selection it attends to (the top pages by the min/max bound, the page being written
always kept) and the attention over exactly those pages, and a new sequence on blocks an earlier one used."""
from __future__ import annotations

import pytest
import torch

from sparsedecode import LLM
from sparsedecode.kernels import gather_blocks
from recording import generate_recording, record_outputs, wrap_attend

PROMPT = [(11 * i) % 400 + 1 for i in range(300)]  # 300 tokens: the last page of 16 is partly filled
OTHER = [(17 * i + 3) % 450 + 2 for i in range(260)]
BLOCK, PAGE = 32, 16  # two pages per pool block


def tiny_llm(**kwargs) -> LLM:
    torch.manual_seed(0)  # the same random weights on every call
    return LLM("random:tiny-llama", device="cpu", block_size=BLOCK, max_context=512, max_num_seqs=4,
               enable_prefix_caching=False, **kwargs)


@pytest.fixture(scope="module")
def tiny() -> LLM:
    return tiny_llm()


def test_budget_covering_the_context_equals_dense(tiny: LLM) -> None:
    tiny.use_method("dense")
    dense = generate_recording(tiny, PROMPT, 8)
    tiny.use_method("quest", budget=1024, page_size=PAGE, dense_layers=0)
    quest = generate_recording(tiny, PROMPT, 8)
    assert len(quest[1]) == 7 * tiny.config.num_layers
    assert quest[0] == dense[0]
    assert all(torch.equal(a, b) for a, b in zip(quest[1], dense[1], strict=True))


@pytest.mark.parametrize("chunk_blocks", [256, 3])  # bounds of the prompt's blocks in one piece, or in several
def test_page_bounds_follow_the_pool_and_the_top_pages_are_read(tiny: LLM, chunk_blocks: int, monkeypatch) -> None:
    from sparsedecode.methods import quest as quest_module

    monkeypatch.setattr(quest_module, "BOUNDS_CHUNK_BLOCKS", chunk_blocks)
    tiny.use_method("quest", budget=64, page_size=PAGE, dense_layers=1)
    quest, config = tiny.method, tiny.config
    seen: list[dict] = []

    def after(layer, q, pool, batch, out):
        seen.append(dict(layer=layer, q=q.clone(), out=out.clone(), table=batch.block_tables[0].clone(),
                         seq_len=int(batch.seq_lens[0]), pages=quest.pages[:1].clone(),
                         counts=quest.counts[:1].clone()))

    wrap_attend(quest, after=after)
    tiny.generate([PROMPT], max_new_tokens=6, stop_token_ids=[])
    pool = tiny.engine.runner.pool
    assert quest.k_min.shape == (config.num_layers, pool.num_blocks, config.num_kv_heads, BLOCK // PAGE,
                                 config.head_dim)
    last = seen[-config.num_layers:]  # the last decode step, layer by layer
    length = len(PROMPT) + 5  # that step read the prompt, the first token and 4 decoded ones
    assert [s["seq_len"] for s in last] == [length] * config.num_layers
    pages = -(-length // PAGE)
    held = -(-length // BLOCK)
    table = last[0]["table"][:held]
    assert (table != 0).all() and len(set(table.tolist())) == held
    filled = (torch.arange(pages * PAGE) < length).view(1, pages, PAGE, 1)
    group = config.num_heads // config.num_kv_heads
    for layer in range(1, config.num_layers):  # layer 0 is dense (dense_layers=1): no bounds kept
        # The keys and the bounds of the sequence's pages, read through its block table (logical order).
        k = gather_blocks(pool.k[layer], table[None])[0, :, : pages * PAGE].unflatten(1, (pages, PAGE))
        k_min = gather_blocks(quest.k_min[layer], table[None])[0, :, :pages]
        k_max = gather_blocks(quest.k_max[layer], table[None])[0, :, :pages]
        torch.testing.assert_close(k_min, k.masked_fill(~filled, float("inf")).amin(2), rtol=0, atol=0)
        torch.testing.assert_close(k_max, k.masked_fill(~filled, float("-inf")).amax(2), rtol=0, atol=0)

        # The last step of this layer scored its pages with these bounds (its key was the last folded in).
        s = last[layer]
        assert s["layer"] == layer and torch.equal(s["table"][:held], table)
        q = s["q"][0].view(config.num_kv_heads, group, 1, -1)  # [Hkv, G, 1, D]
        scores = torch.maximum(q * k_min[:, None], q * k_max[:, None]).sum(-1).amax(1)  # [Hkv, pages]
        keys = gather_blocks(pool.k[layer], table[None])[0]
        values = gather_blocks(pool.v[layer], table[None])[0]
        for h in range(config.num_kv_heads):
            read = s["pages"][0, h, : s["counts"][0, h]].tolist()
            assert s["counts"][0, h] == 64 // PAGE and pages - 1 in read and read == sorted(read)
            best_others = scores[h, : pages - 1].topk(3).indices.sort().values.tolist()
            assert read[:-1] == best_others
            # The output is attention over exactly the tokens of those pages.
            positions = torch.cat([torch.arange(p * PAGE, min((p + 1) * PAGE, length)) for p in read])
            logits = s["q"][0, h * group : (h + 1) * group] @ keys[h, positions].T * config.head_dim**-0.5
            want = logits.softmax(-1) @ values[h, positions]
            torch.testing.assert_close(s["out"][0, h * group : (h + 1) * group], want, rtol=1e-5, atol=1e-5)


def test_a_new_sequence_on_used_blocks_starts_afresh() -> None:
    """Request A, then B in the same slot on A's freed pool blocks: B's page bounds are its own keys' (a
    reused block's bounds are rebuilt, not A's), and B decodes as B alone on a fresh LLM."""
    options = dict(budget=64, page_size=PAGE, dense_layers=1)
    b_prompt = PROMPT[:240]
    need = -(-(len(OTHER) + 8) // BLOCK)
    runs = []
    for llm, prompts in ((tiny_llm(num_blocks=need + 1), (OTHER, b_prompt)),  # every pool block is A's, then B's
                         (tiny_llm(), (b_prompt,))):
        llm.use_method("quest", **options)
        slots: list[int] = []
        tables: list[list[int]] = []

        def after(layer, q, pool, batch, out, slots=slots, tables=tables):
            if layer == 0:
                row = int((batch.block_tables[:, 0] != 0).nonzero()[0])
                slots.append(row)
                tables.append(batch.block_tables[row].tolist())

        wrap_attend(llm.method, after=after)
        blocks_used = []
        for prompt in prompts:
            outputs = record_outputs(llm.method)
            gen = llm.generate([prompt], max_new_tokens=8, stop_token_ids=[])[0]
            blocks_used.append(set(tables[-1]) - {0})
        runs.append((llm, gen, outputs, slots, tables[-1], blocks_used))

    (reused, b, outputs, slots, table, blocks_used), (fresh, alone, alone_outputs, _, alone_table, _) = runs
    assert len(set(slots)) == 1 and len(slots) == 2 * 7  # both sequences in one slot, 7 decode steps each
    assert blocks_used[1] <= blocks_used[0]  # B's pages live in blocks that held A's
    length = len(b_prompt) + 7  # B's last decode step read its prompt and 7 tokens
    pages, held = -(-length // PAGE), -(-length // BLOCK)
    filled = (torch.arange(pages * PAGE) < length).view(1, pages, PAGE, 1)

    def logical(per_block: torch.Tensor, table: list[int]) -> torch.Tensor:
        """One layer's per-block rows (keys or bounds) of a sequence, in its logical order."""
        return gather_blocks(per_block, torch.tensor(table[:held])[None])[0]

    for layer in range(1, reused.config.num_layers):  # layer 0 is dense: no bounds kept
        k = logical(reused.engine.runner.pool.k[layer], table)[:, : pages * PAGE].unflatten(1, (pages, PAGE))
        k_min = logical(reused.method.k_min[layer], table)[:, :pages]
        k_max = logical(reused.method.k_max[layer], table)[:, :pages]
        assert torch.equal(k_min, k.masked_fill(~filled, float("inf")).amin(2))
        assert torch.equal(k_max, k.masked_fill(~filled, float("-inf")).amax(2))
        assert torch.equal(k_min, logical(fresh.method.k_min[layer], alone_table)[:, :pages])
        assert torch.equal(k_max, logical(fresh.method.k_max[layer], alone_table)[:, :pages])
    assert b.token_ids == alone.token_ids
    assert all(torch.equal(x, y) for x, y in zip(outputs, alone_outputs, strict=True))
    assert b.kv_fraction_read == alone.kv_fraction_read < 1
