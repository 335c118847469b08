"""Quest on the engine: page metadata kept up to date while decoding, exactness at full budget, and the
selection it attends to (the top pages by the min/max bound, the page being written always kept)."""
from __future__ import annotations

import pytest
import torch

from sparsedecode import LLM
from recording import generate_recording

PROMPT = [(11 * i) % 400 + 1 for i in range(300)]  # 300 tokens: the last page of 16 is partly filled


@pytest.fixture(scope="module")
def tiny() -> LLM:
    torch.manual_seed(0)
    return LLM("random:tiny-llama", device="cpu", block_size=16)


def test_budget_covering_the_context_equals_dense(tiny: LLM) -> None:
    tiny.use_method("dense")
    dense = generate_recording(tiny, PROMPT, 8)
    tiny.use_method("quest", budget=1024, dense_layers=0)
    quest = generate_recording(tiny, PROMPT, 8)
    assert quest[0] == dense[0]
    assert all(torch.equal(a, b) for a, b in zip(quest[1], dense[1], strict=True))


def test_page_bounds_follow_the_cache_and_the_top_pages_are_read(tiny: LLM) -> None:
    tiny.use_method("quest", budget=64, page_size=16, dense_layers=1)
    quest = tiny.method
    seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    attend = quest.attend

    def recorded(layer, q, cache, seq_lens):
        out = attend(layer, q, cache, seq_lens)
        if layer >= 1:
            seen.append((layer, q.clone(), quest.pages.clone(), quest.counts.clone()))
        return out

    quest.attend = recorded
    tiny.generate([PROMPT], max_new_tokens=6, stop_token_ids=[])
    cache = tiny.cache
    length = len(PROMPT) + 5  # the last generated token is never written to the cache
    pages = -(-length // 16)
    for layer in range(1, cache.num_layers):  # layer 0 is dense (dense_layers=1): no bounds kept
        k = cache.k[layer, 0, :, : pages * 16].unflatten(1, (pages, 16))
        filled = (torch.arange(pages * 16) < length).view(1, pages, 16, 1)
        torch.testing.assert_close(quest.k_min[layer, 0, :, :pages], k.masked_fill(~filled, float("inf")).amin(2))
        torch.testing.assert_close(quest.k_max[layer, 0, :, :pages], k.masked_fill(~filled, float("-inf")).amax(2))
    layer, q, chosen, counts = seen[-1]  # the last step: the bounds above are the ones it scored with
    # scored again with the final bounds (folding the last written key in once more changes nothing)
    scores = quest.page_scores(layer, q, cache, torch.tensor([length]))[0, :, :pages].clone()  # [Hkv, pages]
    for h in range(cache.num_kv_heads):
        read = chosen[0, h, : counts[0, h]].tolist()
        assert counts[0, h] == 4 and pages - 1 in read and read == sorted(read)
        best_others = scores[h, : pages - 1].topk(3).indices.sort().values.tolist()
        assert read[:-1] == best_others
