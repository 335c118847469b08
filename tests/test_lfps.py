"""LFPS: the candidate rules against a plain reference, exactness at full budget and R = 1, the refresh
schedule of each sequence (its own decode steps, decided on the device), the threshold refresh on a
hand-built paged pool and its KV accounting, slot reuse, lychee+lfps, the Triton kernels' path on CUDA,
and option checking."""
from __future__ import annotations

import pytest
import torch

from sparsedecode import LLM
from sparsedecode.bench.lfps_bench import run_recall
from sparsedecode.core import DecodeBatch, KVPool
from sparsedecode.engine import SamplingParams
from sparsedecode.methods import make_method
from sparsedecode.methods.lfps import ATTEND_MODES, PastSelection, candidate_offsets, lfps_candidates
from sparsedecode.core.selection import BlockSelector
from sparsedecode.models.config import model_config_from_hf
from sparsedecode.models.shapes import random_shape_config
from recording import generate_recording, record_outputs, wrap_attend

PROMPT = [(7 * i) % 500 + 1 for i in range(700)]
OTHER = [(13 * i + 5) % 480 + 3 for i in range(450)]  # a second request, no prefix in common with PROMPT


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


def tiny_llm(seed: int = 0, **kwargs) -> LLM:
    """The test model; the same random weights on every call with one `seed`. No prefix caching: every
    generation computes its whole prompt, so two runs of one prompt decode bit for bit alike."""
    torch.manual_seed(seed)
    return LLM("random:tiny-llama", device="cpu", block_size=16, max_context=1024, max_num_seqs=4,
               enable_prefix_caching=False, **kwargs)


@pytest.fixture(scope="module")
def tiny() -> LLM:
    return tiny_llm()


def record(llm: LLM, method: str, **options) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and every attention output of a generation."""
    llm.use_method(method, **options)
    return generate_recording(llm, PROMPT, 10)


def analytic_kv_rows(method, config, prompt: int, decoded: int) -> tuple[float, float]:
    """(method's, dense) K/V rows of `decoded` decode steps after a `prompt`-token prompt: step s reads the
    prompt, the first token and the s tokens decoded before it."""
    sparse = sum(method.kv_tokens_read(prompt + s + 1, s) for s in range(decoded))
    dense = sum(config.num_layers * config.num_kv_heads * (prompt + s + 1) for s in range(decoded))
    return sparse, dense


@pytest.mark.parametrize("seed", [0, 1, 4, 6])
def test_budget_covering_the_context_equals_dense(seed: int) -> None:
    """A budget covering the context makes every list hold every block, in order: the attention outputs are
    dense's bit for bit, on refresh and predicted steps alike, though lfps's 16-token blocks are not dense's
    64-token units. Over several weight draws: a rounding difference shows on some of them only."""
    llm = tiny_llm(seed)
    dense = record(llm, "dense")
    for attend in ATTEND_MODES:
        tokens, outputs = record(llm, "lfps", budget=1024, block_size=16, refresh_every=4, attend=attend)
        assert len(outputs) == 9 * llm.config.num_layers  # 9 decode steps (the first token comes from the prefill)
        assert tokens == dense[0]
        differing = [i for i, (a, b) in enumerate(zip(outputs, dense[1], strict=True)) if not torch.equal(a, b)]
        assert not differing, f"attend={attend}: outputs (step, layer) " + str(
            [divmod(i, llm.config.num_layers) for i in differing])


def test_sparse_budget_reads_less_and_stays_close(tiny: LLM) -> None:
    dense = record(tiny, "dense")
    tokens, outputs = record(tiny, "lfps", budget=128, refresh_every=4)
    past, layers = tiny.method.past, tiny.config.num_layers
    assert [bool(past.refresh_step(s)) for s in range(9)] == [True, False, False, False, True, False, False,
                                                             False, True]
    # A step's count: every token on a refresh step, at most the candidate lists' tokens otherwise.
    rows = layers * tiny.config.num_kv_heads
    for seq_len, step in [(701, 0), (702, 1), (704, 3), (705, 4), (706, 5)]:
        scored = seq_len if step % 4 == 0 else past.candidate_tokens(seq_len)
        assert tiny.method.kv_tokens_read(seq_len, step) == rows * scored
    assert past.candidate_tokens(702) == (8 * 3 + 1 + 1) * 16 < 702  # 8 kept blocks, each +-1 and +1; sink, local
    # The first decode step is exact (full rows) in every layer; the next one reads candidates only.
    assert all(torch.equal(a, b) for a, b in zip(outputs[:layers], dense[1][:layers], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(outputs[layers : 2 * layers], dense[1][layers : 2 * layers]))
    assert tokens[:2] == dense[0][:2]  # the prefill's token, and the exact first decode step's
    gen = tiny.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0]
    assert gen.kv_fraction_read < 0.8


def test_refresh_schedule_is_per_sequence(tiny: LLM) -> None:
    """Each sequence refreshes on its own decode steps 0, R, 2R, ... whichever step the batch is at (the
    rows are decided on the device from `DecodeBatch.steps`): a request joining later decodes and is counted
    as it would be alone, and its candidate lists stay within what the accounting charges."""
    R = 4
    tiny.use_method("lfps", budget=128, refresh_every=R)
    method, config = tiny.method, tiny.config
    steps_seen: list[torch.Tensor] = []
    full_seen: list[torch.Tensor] = []
    tables_seen: list[torch.Tensor] = []

    def before(layer, q, pool, batch, out):
        if layer == 0:
            steps_seen.append(batch.steps.clone())
            full_seen.append(method.past.full_rows(0, batch.size).clone())
            tables_seen.append(batch.block_tables[:, 0].clone())
        _, counts = method.past.candidates(layer, batch.seq_lens)  # the lists attend is about to score
        for row in range(batch.size):
            if batch.block_tables[row, 0] != 0:  # a row holding a sequence
                charged = method.past.candidate_tokens(int(batch.seq_lens[row]))
                assert int(counts[row].max()) * method.past.selector.block_size <= charged

    wrap_attend(method, before=before)
    engine, params = tiny.engine, SamplingParams(max_tokens=10, ignore_eos=True)
    ids, finished, step = [engine.add_request(PROMPT, params)], {}, 0
    while engine.has_unfinished_requests():
        if step == 3:  # the first request has taken two decode steps by now
            ids.append(engine.add_request(OTHER, params))
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
        step += 1

    per_slot: dict[int, list[int]] = {}
    saw_different_rows = False
    for steps, full, first_blocks in zip(steps_seen, full_seen, tables_seen):
        active = (first_blocks != 0).nonzero().flatten().tolist()
        for row in active:
            per_slot.setdefault(row, []).append(int(steps[row]))
            assert full[row].all() == (int(steps[row]) % R == 0) and full[row].all() == full[row].any()
        if len(active) == 2 and not torch.equal(full[active[0]], full[active[1]]):
            saw_different_rows = True
    assert per_slot == {0: list(range(9)), 1: list(range(9))}  # each counts its own steps from 0
    assert saw_different_rows  # one refreshing while the other is not, in the same step

    for request_id, prompt in zip(ids, (PROMPT, OTHER)):
        tiny.use_method("lfps", budget=128, refresh_every=R)
        alone = tiny.generate([prompt], max_new_tokens=10, stop_token_ids=[])[0]
        together = finished[request_id]
        assert together.token_ids == alone.token_ids
        sparse, dense = analytic_kv_rows(tiny.method, config, len(prompt), 9)
        assert together.kv_fraction_read == pytest.approx(sparse / dense)
        assert alone.kv_fraction_read == pytest.approx(sparse / dense)


def test_recall_is_one_when_every_step_is_exact() -> None:
    rows = run_recall("random:tiny-llama", [512], 6, 64, (16,), (1,), refresh=(1, 3), device="cpu")
    by_r = {r["R"]: r for r in rows}
    assert by_r[1]["block_recall"] == 1.0 and by_r[1]["out_err_candidates"] == 0.0
    assert by_r[1]["block_recall_predicted"] is None  # no predicted steps
    assert 0.0 < by_r[3]["block_recall_predicted"] <= 1.0
    assert 0.0 < by_r[3]["candidate_fraction"] < 1.0


def test_refresh_threshold_makes_the_next_step_full() -> None:
    """A query that turns to keys outside the candidates collapses their mass; the row's flag is set on
    the device, and the next (non-refresh) step is a full row that finds the new block. Two sequences
    with shuffled block tables share the pool and the batch: the second keeps finding its own block, is
    never forced, and refreshes on its own steps."""
    config = model_config_from_hf(random_shape_config("random:tiny-llama"))
    bs, kv_heads, dim = 16, config.num_kv_heads, config.head_dim
    method = make_method("lfps", config, budget=64, block_size=bs, refresh_every=100, expand=0,
                         refresh_threshold=0.5)
    pool = KVPool(config.num_layers, 80, kv_heads, bs, dim, torch.float32, "cpu")
    max_blocks = 32
    method.plan(pool, max_seqs=2, max_blocks=max_blocks)
    past = method.past
    torch.manual_seed(0)
    pool.k.normal_(0, 0.1)
    pool.v.normal_()
    seq_lens = torch.tensor([500, 300], dtype=torch.int32)
    physical = torch.randperm(79)[: 2 * max_blocks] + 1  # never the null block 0
    tables = physical.view(2, max_blocks).to(torch.int32)
    tables[1, -(-300 // bs):] = 0  # the second sequence holds 19 blocks; the rest of its row is null
    far, own = 20, 7  # a block far from the sink, the local window and the first pick; the second's block
    near_key, far_key = torch.zeros(dim), torch.zeros(dim)
    near_key[0], far_key[1] = 1.0, 1.0
    pool.k[0, tables[0, 5]] += 40 * near_key
    pool.k[0, tables[0, far]] += 40 * far_key
    pool.k[0, tables[1, own]] += 40 * near_key

    def step(steps: tuple[int, int], key: torch.Tensor) -> torch.Tensor:
        """One layer-0 step; the query of the second sequence is always `near_key`. Returns its full rows."""
        batch = DecodeBatch(tables, seq_lens, torch.tensor(steps, dtype=torch.int32))
        method.begin_step(batch)
        full = past.full_rows(0, 2).clone()
        q = torch.stack([key, near_key])[:, None].expand(2, config.num_heads, dim).clone()
        method.attend(0, q, pool, batch)
        for h in range(kv_heads):
            assert own in past.blocks[0, 1, h, : past.counts[0, 1, h]].tolist()
        return full

    def selected(row: int) -> list[list[int]]:
        return [past.blocks[0, row, h, : past.counts[0, row, h]].tolist() for h in range(kv_heads)]

    full = step((0, 0), near_key + 0.5 * far_key)  # both decode step 0: exact, block 5 and block 20 score
    assert full.all()
    assert all(far in blocks for blocks in selected(0))
    full = step((100, 1), near_key)  # an exact step of the first only, now only block 5 stands out
    assert full[0].all() and not full[1].any()
    assert all(far not in blocks for blocks in selected(0))
    full = step((101, 2), far_key)  # candidates miss block 20: their mass collapses
    assert not full.any()
    assert past.force_full[0, 0].all() and not past.force_full[0, 1].any()
    assert past.forced_rows.tolist() == [0, 0]
    full = step((102, 3), far_key)  # full rows: block 20 is found again, and the flags clear
    assert full[0].all() and not full[1].any()
    assert all(far in blocks for blocks in selected(0))
    assert not past.force_full[0].any()
    # The forced rows are counted when used, per slot, and priced as full rows instead of candidate lists.
    assert past.forced_rows.tolist() == [kv_heads, 0]
    assert method.extra_kv_tokens_read(0, 500.0) == kv_heads * (500 - past.candidate_tokens(500))
    assert method.extra_kv_tokens_read(1, 300.0) == 0.0
    # A new sequence in slot 0 starts with no past selection, flags or count; slot 1 keeps its state.
    counts_before = past.counts[:, 1].clone()
    method.reset_slot(0)
    assert past.forced_rows.tolist() == [0, 0] and method.extra_kv_tokens_read(0, 500.0) == 0.0
    assert (past.counts[:, 0] == 0).all() and (past.blocks[:, 0] == past.num_blocks).all()
    assert not past.force_full[:, 0].any() and past.exact_lse[:, 0].isinf().all()
    assert torch.equal(past.counts[:, 1], counts_before) and past.counts[0, 1].min() > 0


def test_threshold_refreshes_count_in_the_kv_read(tiny: LLM) -> None:
    """The generation's KV fraction (and bytes per token) is the analytic count of its decode steps plus the
    rows the threshold forced full on the device, priced once at its end at its mean length; the next
    sequence in the slot starts the count again."""
    tiny.use_method("lfps", budget=32, refresh_every=100, refresh_threshold=0.999)
    method, config = tiny.method, tiny.config
    extras: list[tuple[int, float, float, int]] = []  # slot, mean length, extra rows, forced rows
    extra_kv_tokens_read = method.extra_kv_tokens_read

    def recorded(slot: int, mean_seq_len: float) -> float:
        extra = extra_kv_tokens_read(slot, mean_seq_len)
        extras.append((slot, mean_seq_len, extra, int(method.past.forced_rows[slot])))
        return extra

    method.extra_kv_tokens_read = recorded
    gens = [tiny.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0] for _ in range(2)]
    assert len(extras) == 2 and extras[0][0] == extras[1][0]  # once per sequence, both in one slot
    assert extras[0][2:] == extras[1][2:]  # the same count, not twice it
    forced = extras[1][3]
    assert 0 < forced <= 9 * config.num_layers * config.num_kv_heads  # 9 steps after the exact first one
    row_bytes = 2 * config.head_dim * tiny.dtype.itemsize
    for gen, (_, mean_len, extra, _) in zip(gens, extras):
        prompt, decoded = gen.prompt_tokens, len(gen.token_ids) - 1
        assert (prompt, decoded) == (len(PROMPT), 9)
        assert mean_len == pytest.approx(sum(prompt + s + 1 for s in range(decoded)) / decoded)
        assert extra == pytest.approx(forced * (mean_len - method.past.candidate_tokens(round(mean_len))))
        assert extra > 0
        sparse, dense = analytic_kv_rows(method, config, prompt, decoded)
        assert gen.kv_fraction_read == pytest.approx((sparse + extra) / dense)
        assert gen.kv_bytes_per_token == pytest.approx((sparse + extra) * row_bytes / decoded)


def test_a_used_slot_starts_afresh(tiny: LLM) -> None:
    """Request A, then B in the same decode slot: B decodes and is counted exactly as B alone on a fresh LLM
    (A's selections, flags and forced-row count are forgotten)."""
    options = dict(budget=32, refresh_every=100, refresh_threshold=0.999)
    tiny.use_method("lfps", **options)
    method, slots = tiny.method, []
    reset_slot = method.reset_slot
    method.reset_slot = lambda slot: (slots.append(slot), reset_slot(slot))[1]
    tiny.generate([OTHER], max_new_tokens=10, stop_token_ids=[])
    forced_by_a = int(method.past.forced_rows[slots[0]])
    outputs = record_outputs(method)
    b = tiny.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0]
    assert len(slots) == 2 and slots[0] == slots[1]
    assert forced_by_a > 0 and int(method.past.forced_rows[slots[1]]) > 0

    fresh = tiny_llm()
    fresh.use_method("lfps", **options)
    alone_outputs = record_outputs(fresh.method)
    alone = fresh.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0]
    assert b.token_ids == alone.token_ids
    assert all(torch.equal(x, y) for x, y in zip(outputs, alone_outputs, strict=True))
    assert b.kv_fraction_read == pytest.approx(alone.kv_fraction_read, rel=1e-12)


def test_lychee_lfps_with_refresh_every_step_is_lychee(tiny: LLM) -> None:
    lychee = record(tiny, "lychee", roles="random:3", budget=64)
    tokens, outputs = record(tiny, "lychee+lfps", roles="random:3", budget=64, refresh_every=1)
    assert tokens == lychee[0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs, lychee[1], strict=True))
    tiny.use_method("lychee+lfps", roles="random:3", budget=64, refresh_every=8)
    predicted = tiny.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0]
    tiny.use_method("lychee", roles="random:3", budget=64)
    full_scans = tiny.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0]
    assert predicted.kv_fraction_read < full_scans.kv_fraction_read


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
    eager = LLM("random:tiny-llama", device="cuda", block_size=16, max_context=1024, max_num_seqs=4,
                cuda_graphs=False)
    torch.manual_seed(0)
    graphs = LLM("random:tiny-llama", device="cuda", block_size=16, max_context=1024, max_num_seqs=4)
    graphs.use_method(method, **options)
    graphed_tokens = graphs.generate([PROMPT], max_new_tokens=10, stop_token_ids=[])[0].token_ids
    kernels = record(eager, method, **options)
    monkeypatch.setattr(PastSelection, "uses_kernel", staticmethod(lambda device: False))
    monkeypatch.setattr(BlockSelector, "uses_kernel", lambda self, device, num_blocks: False)
    pytorch = record(eager, method, **options)
    assert not eager.method.past.use_kernel
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
