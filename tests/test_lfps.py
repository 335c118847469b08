"""LFPS: the candidate rules against a plain reference, exactness at full budget and R = 1, the on-device
refresh flag, lychee+lfps, the Triton kernels' path on CUDA, and option checking."""
from __future__ import annotations

import pytest
import torch

from sparsedecode import LLM
from sparsedecode.bench.lfps_bench import run_recall
from sparsedecode.engine.kv_cache import KVCache
from sparsedecode.methods.base import make_method
from sparsedecode.methods.lfps import PastSelection, candidate_offsets, lfps_candidates
from sparsedecode.methods.selection import BlockSelector
from sparsedecode.models.config import model_config_from_hf
from sparsedecode.models.shapes import random_shape_config
from recording import generate_recording

PROMPT = [(7 * i) % 500 + 1 for i in range(700)]


def reference_candidates(previous: list[int], seq_len: int, block_size: int, expand: int, sink: int,
                         local: int) -> list[int]:
    """The candidate rules written out: vertical, slash, expansion, sink, local window, inside the context."""
    held = -(-seq_len // block_size)
    found = set()
    for block in previous:
        found.add(block)  # vertical: the same positions
        found.add(block + 1)  # slash: positions a fixed distance back move forward with the step
        for d in range(1, expand + 1):  # positional expansion
            found.update((block - d, block + d))
    found.update(range(sink))
    found.update(range(held - local, held))
    return sorted(b for b in found if 0 <= b < held)


@pytest.mark.parametrize("expand,sink,local", [(0, 1, 1), (1, 1, 1), (2, 0, 2), (1, 2, 0)])
def test_candidates_match_the_reference_rules(expand: int, sink: int, local: int) -> None:
    gen = torch.Generator().manual_seed(expand * 10 + sink + local)
    batch, heads, kept, num_blocks, block_size = 3, 4, 6, 40, 16
    seq_lens = torch.randint(block_size, num_blocks * block_size + 1, (batch,), generator=gen, dtype=torch.int32)
    blocks = torch.full((batch, heads, kept), num_blocks, dtype=torch.int32)
    counts = torch.randint(0, kept + 1, (batch, heads), generator=gen, dtype=torch.int32)
    for b in range(batch):
        held = -(-int(seq_lens[b]) // block_size)
        for h in range(heads):
            n = min(int(counts[b, h]), held)
            counts[b, h] = n
            blocks[b, h, :n] = torch.randperm(held, generator=gen)[:n].sort().values
    offsets = torch.tensor(candidate_offsets(expand))
    lists, n = lfps_candidates(blocks, counts, seq_lens, block_size, offsets, sink, local, num_blocks)
    assert lists.shape[-1] == kept * len(offsets) + sink + local
    for b in range(batch):
        for h in range(heads):
            previous = blocks[b, h, : counts[b, h]].tolist()
            want = reference_candidates(previous, int(seq_lens[b]), block_size, expand, sink, local)
            assert n[b, h] == len(want)
            assert lists[b, h, : len(want)].tolist() == want
            assert (lists[b, h, len(want):] == num_blocks).all()


@pytest.fixture(scope="module")
def tiny() -> LLM:
    torch.manual_seed(0)
    return LLM("random:tiny-llama", device="cpu", block_size=16)


def record(llm: LLM, method: str, **options) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and every attention output of a generation."""
    llm.use_method(method, **options)
    return generate_recording(llm, PROMPT, 10)


@pytest.mark.parametrize("attend", ["candidates", "selected"])
def test_budget_covering_the_context_equals_dense(tiny: LLM, attend: str) -> None:
    dense = record(tiny, "dense")
    tokens, outputs = record(tiny, "lfps", budget=1024, refresh_every=4, attend=attend)
    assert tokens == dense[0]
    assert all(torch.equal(a, b) for a, b in zip(outputs, dense[1], strict=True))


def test_sparse_budget_reads_less_and_stays_close(tiny: LLM) -> None:
    dense = record(tiny, "dense")
    tiny.use_method("lfps", budget=128, refresh_every=4)
    gen = tiny.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0]
    assert gen.kv_fraction_read < 0.8
    assert tiny.method.step_variant(0) == tiny.method.step_variant(4) == "refresh"
    assert tiny.method.step_variant(1) == "default"
    _, outputs = record(tiny, "lfps", budget=128, refresh_every=4)
    assert torch.equal(outputs[0], dense[1][0])  # the first step is exact: full rows


def test_recall_is_one_when_every_step_is_exact() -> None:
    rows = run_recall("random:tiny-llama", [512], 6, 64, (16,), (1,), refresh=(1, 3), device="cpu")
    by_r = {r["R"]: r for r in rows}
    assert by_r[1]["block_recall"] == 1.0 and by_r[1]["out_err_candidates"] == 0.0
    assert by_r[1]["block_recall_predicted"] is None  # no predicted steps
    assert 0.0 < by_r[3]["block_recall_predicted"] <= 1.0
    assert 0.0 < by_r[3]["candidate_fraction"] < 1.0


def test_refresh_threshold_makes_the_next_step_full() -> None:
    """A query that turns to keys outside the candidates collapses their mass; the row's flag is set on
    the device, and the next (non-refresh) step is a full row that finds the new block."""
    config = model_config_from_hf(random_shape_config("random:tiny-llama"))
    method = make_method("lfps", config, budget=64, block_size=16, refresh_every=100, expand=0, refresh_threshold=0.5)
    cache = KVCache(config.num_layers, 1, config.num_kv_heads, 512, config.head_dim, 16, torch.float32, "cpu")
    method.plan(cache)
    torch.manual_seed(0)
    cache.k.normal_(0, 0.1)
    cache.v.normal_()
    far = 20  # a block far from the sink, the local window and the first pick
    near_key, far_key = torch.zeros(config.head_dim), torch.zeros(config.head_dim)
    near_key[0], far_key[1] = 1.0, 1.0
    cache.k[0, 0, :, 5 * 16 : 6 * 16] += 40 * near_key
    cache.k[0, 0, :, far * 16 : (far + 1) * 16] += 40 * far_key
    seq_lens = torch.tensor([500], dtype=torch.int32)

    def step(variant: str, key: torch.Tensor) -> None:
        method.set_variant(variant)
        method.attend(0, key.expand(1, config.num_heads, -1).clone(), cache, seq_lens)

    step("refresh", near_key + 0.5 * far_key)  # exact: both block 5 and block 20 score
    assert far in method.past.blocks[0, 0, 0].tolist()
    step("refresh", near_key)  # exact again, now only block 5 stands out
    assert far not in method.past.blocks[0, 0, 0].tolist()
    step("default", far_key)  # candidates miss block 20: their mass collapses
    assert method.past.force_full[0].all()
    assert method.past.forced_rows.tolist() == [0]
    step("default", far_key)  # full row: block 20 is found again, and the flag clears
    assert far in method.past.blocks[0, 0, 0].tolist()
    assert not method.past.force_full[0].any()
    # The forced rows are counted when used, and priced as full rows instead of candidate lists.
    forced = config.num_kv_heads
    assert method.past.forced_rows.tolist() == [forced]
    assert method.extra_kv_tokens_read([500.0]) == [forced * (500 - method.past.candidate_tokens(500))]


def test_threshold_refreshes_count_in_the_kv_read(tiny: LLM) -> None:
    """The generation's KV fraction is the analytic count of the scheduled steps plus the rows the
    threshold forced full on the device; a new prefill starts the count again."""
    counts = []
    for _ in range(2):  # the same generation twice: the count restarts with the prefill
        tiny.use_method("lfps", budget=32, refresh_every=100, refresh_threshold=0.999)
        gen = tiny.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0]
        counts.append(int(tiny.method.past.forced_rows[0]))
    method, config = tiny.method, tiny.config
    forced = counts[1]
    assert counts[0] == forced
    assert 0 < forced <= 9 * config.num_layers * config.num_kv_heads  # 9 steps after the exact first one
    prompt, decoded = gen.prompt_tokens, len(gen.token_ids) - 1
    analytic = sum(method.kv_tokens_read(prompt + s, method.step_variant(s - 1)) for s in range(1, decoded + 1))
    mean_len = prompt + (decoded + 1) / 2
    extra = forced * (mean_len - method.past.candidate_tokens(round(mean_len)))
    dense = sum(config.num_layers * config.num_kv_heads * (prompt + s) for s in range(1, decoded + 1))
    assert extra > 0
    assert gen.kv_fraction_read == pytest.approx((analytic + extra) / dense)


def test_lychee_lfps_with_refresh_every_step_is_lychee(tiny: LLM) -> None:
    lychee = record(tiny, "lychee", roles="random:3", budget=64)
    tokens, outputs = record(tiny, "lychee+lfps", roles="random:3", budget=64, refresh_every=1)
    assert tokens == lychee[0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs, lychee[1], strict=True))
    tiny.use_method("lychee+lfps", roles="random:3", budget=64, refresh_every=8)
    predicted = tiny.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0]
    tiny.use_method("lychee", roles="random:3", budget=64)
    assert predicted.kv_fraction_read < tiny.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0].kv_fraction_read


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("method,options", [
    ("lfps", dict(budget=128, refresh_every=4)),
    ("lfps", dict(budget=128, refresh_every=4, attend="selected", refresh_threshold=0.5)),
    ("lychee+lfps", dict(roles="random:3", budget=64, refresh_every=4)),
])
def test_kernels_decode_like_the_pytorch_path(monkeypatch: pytest.MonkeyPatch, method: str, options: dict) -> None:
    """On CUDA the candidate lists and the selections come from the Triton kernels; the PyTorch path must
    give the same tokens (with CUDA graphs too) and the same attention outputs."""
    torch.manual_seed(0)  # the same random weights in both
    eager = LLM("random:tiny-llama", device="cuda", block_size=16, cuda_graphs=False)
    torch.manual_seed(0)
    graphs = LLM("random:tiny-llama", device="cuda", block_size=16)
    graphs.use_method(method, **options)
    graphed_tokens = graphs.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0].token_ids
    kernels = record(eager, method, **options)
    monkeypatch.setattr(PastSelection, "uses_kernel", staticmethod(lambda device: False))
    monkeypatch.setattr(BlockSelector, "uses_kernel", lambda self, device, num_blocks: False)
    pytorch = record(eager, method, **options)
    assert kernels[0] == pytorch[0] == graphed_tokens
    assert all(torch.equal(a, b) for a, b in zip(kernels[1], pytorch[1], strict=True))


@pytest.mark.parametrize("method,options,message", [
    ("lfps", dict(attend="both"), "attend must be"),
    ("lfps", dict(refresh_every=0), "refresh_every"),
    ("lfps", dict(expand=-1), "expand"),
    ("lfps", dict(refresh_threshold=1.5), "refresh_threshold"),
    ("lfps", dict(block_size=48), "block_size"),
    ("lfps", dict(aggregate="mean"), "aggregate"),
    ("lychee+lfps", dict(budget_mode="top_p", budget=0.9, roles="all"), "budget_mode"),
])
def test_bad_options_are_refused(method: str, options: dict, message: str) -> None:
    config = model_config_from_hf(random_shape_config("random:tiny-llama"))
    with pytest.raises(ValueError, match=message):
        make_method(method, config, **options)
