"""The one-launch Triton block selection against the PyTorch path (`block_scores` + `BlockSelector.select`).

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (see triton_cpu); with CUDA the
same cases also run the compiled kernel on the GPU. Blocks and counts must be equal, bit for bit, and
rows outside the mask must keep their old entries.

The reference is the PyTorch path on the same device. On CUDA the kernel's exp and summation order are
PyTorch's, so any scores must agree. The exponential of the interpreter is NumPy's and can differ
from PyTorch's CPU one in the last bit, so the CPU cases make equal scores exactly equal (same operands)
and keep different scores apart: random continuous values (a near-tie at the cut is a ~1e-4 event per
row, fixed seeds), log-probabilities on a grid of quarters with integer row log-sum-exps (exact
differences; their sums only on CUDA), and duplicated blocks.
"""
import importlib
import zlib

import torch

from triton_cpu import devices, fix_interpreter, interpreted, run_in_fresh_process  # sets TRITON_INTERPRET

import pytest  # noqa: E402

from sparsedecode.kernels import select_blocks  # noqa: E402
from sparsedecode.core.selection import BlockSelector, block_scores  # noqa: E402

# (the package's `select_blocks` is the function: the module is fetched by name)
INTERPRET = interpreted(importlib.import_module("sparsedecode.kernels.select_blocks")._select_blocks_kernel)
NEEDS_FRESH_PROCESS = not INTERPRET and not torch.cuda.is_available()
if INTERPRET:
    fix_interpreter()
DEVICES = devices(INTERPRET)
# inf - inf of empty rows is NaN by design (read as 0); the interpreter's numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

BLOCK = 16
# valid blocks: 0 (empty), 1 and 2 (below sink + local), ragged, a whole multiple, the full capacity
LENS = [0, 5, 17, 33, 100, 257, 400, 640]


def make_scores(kind, batch, kv_heads, group, num_blocks, seed):
    """unit_lse [B, Hq, NB] and lse [B, Hq] float32, with -inf holes."""
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    if kind == "random":
        unit_lse = torch.randn(batch, heads, num_blocks, generator=gen) * 3
        holes = torch.rand(unit_lse.shape, generator=gen) < 0.2
        unit_lse = unit_lse.masked_fill(holes, float("-inf"))
        lse = torch.logsumexp(unit_lse, dim=-1) + torch.rand(batch, heads, generator=gen)
    elif kind == "grid":  # log-probabilities -k/4, exact: many blocks share the group max
        lse = torch.randint(0, 3, (batch, heads), generator=gen).float()
        steps = torch.randint(0, 12, (batch, heads, num_blocks), generator=gen).float()
        unit_lse = lse[..., None] - steps / 4
        holes = torch.rand(unit_lse.shape, generator=gen) < 0.2
        unit_lse = unit_lse.masked_fill(holes, float("-inf"))
    else:  # "duplicates": random values, a third of the blocks copies of others (all query heads)
        unit_lse, lse = make_scores("random", batch, kv_heads, group, num_blocks, seed)
        source = torch.randint(0, num_blocks, (num_blocks,), generator=gen)
        copy = torch.rand(num_blocks, generator=gen) < 0.35
        unit_lse[..., copy] = unit_lse[..., source[copy]]
    if batch > 1:  # an empty row: every block and the row log-sum-exp -inf (NaN probabilities -> 0)
        unit_lse[-1, 0] = float("-inf")
        lse[-1, 0] = float("-inf")
    return unit_lse, lse


def old_lists(batch, kv_heads, k_len, seed):
    """Stale blocks / counts the kernel must overwrite (masked rows) or keep (the others)."""
    gen = torch.Generator().manual_seed(seed + 1)
    blocks = torch.randint(-5, 1000, (batch, kv_heads, k_len), generator=gen, dtype=torch.int32)
    counts = torch.randint(-5, 1000, (batch, kv_heads), generator=gen, dtype=torch.int32)
    rows = torch.rand(batch, kv_heads, generator=gen) < 0.7
    rows[0, 0] = True
    rows[-1, -1] = False
    return blocks, counts, rows


def run_case(device, selector, unit_lse, lse, lens, aggregate, kv_heads, share_heads=False, seed=0, all_rows=False):
    """Kernel (on `device`) and PyTorch path (CPU) from the same stale lists; lse None: block scores."""
    batch, _, num_blocks = unit_lse.shape
    scores_only = lse is None
    k_len = selector.list_length(num_blocks * selector.block_size)
    blocks, counts, rows = old_lists(batch, kv_heads, k_len, seed)
    if all_rows:
        rows.fill_(True)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    args = dict(unit_lse=unit_lse, lse=lse) if not scores_only else dict(scores=unit_lse)

    on = {k: v.to(device) for k, v in args.items()}
    results = []
    for use_kernel in (False, True):  # the PyTorch path and the kernel, on the same device
        out_blocks, out_counts = blocks.to(device), counts.to(device)
        selector.select_into(out_blocks, out_counts, rows.to(device), seq_lens.to(device), aggregate=aggregate,
                             share_heads=share_heads, use_kernel=use_kernel, **on)
        results += [out_blocks.cpu(), out_counts.cpu()]
    ref_blocks, ref_counts, got_blocks, got_counts = results

    assert torch.equal(got_counts, ref_counts)
    assert torch.equal(got_blocks, ref_blocks)
    # untouched rows keep their stale entries, bit for bit
    assert torch.equal(got_blocks[~rows], blocks[~rows]) and torch.equal(got_counts[~rows], counts[~rows])
    # and the updated rows are well formed: ascending valid blocks, then the sentinel
    for b, h in rows.nonzero().tolist():
        n = int(got_counts[b, h])
        valid = -(-lens[b] // selector.block_size)
        listed = got_blocks[b, h]
        assert 0 <= n <= min(valid, k_len)
        assert torch.all(listed[:n][1:] > listed[:n][:-1]) and torch.all(listed[:n] < valid)
        assert torch.all(listed[n:] == num_blocks)
    return got_blocks, got_counts, rows


SELECTORS = {
    "tokens": BlockSelector("tokens", 128, BLOCK, sink_blocks=2, local_blocks=3),
    "ratio": BlockSelector("ratio", 0.3, BLOCK, sink_blocks=1, local_blocks=2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["tokens", "ratio"])
@pytest.mark.parametrize("aggregate", ["max", "sum"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("kind", ["random", "grid", "duplicates"])
def test_matches_reference(device, mode, aggregate, group, kind):
    if kind == "grid" and aggregate == "sum" and device == "cpu":
        pytest.skip("NumPy's exp: sums of grid values, equal in other orders, differ by an ulp from PyTorch's")
    seed = zlib.crc32(f"{mode}-{aggregate}-{group}-{kind}".encode()) % 1000  # fixed across runs
    unit_lse, lse = make_scores(kind, len(LENS), 2, group, 40, seed)  # NB = 40: padded to 64
    run_case(device, SELECTORS[mode], unit_lse, lse, LENS, aggregate, 2, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_block(device):
    """Equal scores everywhere: the kept blocks are the sinks, the locals and the lowest others."""
    selector = SELECTORS["tokens"]  # 8 blocks: 2 sinks, 3 local, 3 more
    unit_lse = torch.zeros(2, 4, 40)  # exp(0 - 0) = 1 for every block and head
    lse = torch.zeros(2, 4)
    blocks, counts, _ = run_case(device, selector, unit_lse, lse, [640, 300], "sum", 2, all_rows=True)
    assert blocks[0, 0].tolist() == [0, 1, 2, 3, 4, 37, 38, 39]
    assert blocks[1, 0].tolist() == [0, 1, 2, 3, 4, 16, 17, 18]
    assert counts[0, 0] == 8


@pytest.mark.parametrize("device", DEVICES)
def test_budget_below_the_forced_blocks(device):
    """K of 2 with 5 forced blocks: the two lowest forced blocks (the sinks) win the tie."""
    selector = BlockSelector("tokens", 32, BLOCK, sink_blocks=2, local_blocks=3)
    unit_lse, lse = make_scores("random", len(LENS), 2, 4, 40, seed=3)
    blocks, counts, _ = run_case(device, selector, unit_lse, lse, LENS, "max", 2, all_rows=True)
    assert blocks[0, 0].tolist() == [40, 40] and counts[0, 0] == 0  # empty sequence
    assert blocks[1, 0].tolist() == [0, 40] and counts[1, 0] == 1  # one block
    assert blocks[-1, 1].tolist() == [0, 1] and counts[-1, 1] == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["tokens", "ratio"])
@pytest.mark.parametrize("kind", ["random", "grid"])
def test_shared_heads_and_precomputed_scores(device, mode, kind):
    """TidalDecode's sum over the KV heads, and scores given instead of log-sum-exps."""
    if kind == "grid" and device == "cpu":
        pytest.skip("NumPy's exp: sums of grid values, equal in other orders, differ by an ulp from PyTorch's")
    unit_lse, lse = make_scores(kind, len(LENS), 4, 2, 40, seed=11)
    run_case(device, SELECTORS[mode], unit_lse, lse, LENS, "max", 4, share_heads=True, seed=11)
    scores = block_scores(unit_lse, lse, 4, "sum")
    run_case(device, SELECTORS[mode], scores, None, LENS, "sum", 4, seed=12)
    run_case(device, SELECTORS[mode], scores, None, LENS, "sum", 4, share_heads=True, seed=13)


@pytest.mark.parametrize("device", DEVICES)
def test_signed_scores_without_sink(device):
    """Quest's selection: page bounds of q.k, negative as often as not, no sink, the newest page kept."""
    scores = torch.randn(len(LENS), 2, 40, generator=torch.Generator().manual_seed(21)) * 5
    quest = BlockSelector("tokens", 4 * BLOCK, BLOCK, sink_blocks=0, local_blocks=1)
    run_case(device, quest, scores, None, LENS, "max", 2, seed=21)


@pytest.mark.parametrize("device", DEVICES)
def test_many_blocks(device):
    """4096 blocks (256K tokens of 64): the largest shape of the engine's usual caches."""
    selector = BlockSelector("tokens", 4096, 64, sink_blocks=1, local_blocks=1)
    unit_lse, lse = make_scores("duplicates", 2, 2, 4, 4096, seed=5)
    run_case(device, selector, unit_lse, lse, [4096 * 64, 1000 * 64 + 3], "max", 2, seed=5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_kernel", [False, True])
def test_copy_to_gets_the_same_rows(device, use_kernel):
    """copy_to (lychee+lfps: the retrieval rows' own selection and the blocks handed on, in one launch):
    the masked rows of both pairs equal, the other rows of the copy keep their own stale entries."""
    selector = SELECTORS["tokens"]
    unit_lse, lse = make_scores("random", len(LENS), 3, 4, 40, seed=31)
    k_len = selector.list_length(40 * BLOCK)
    blocks, counts, rows = old_lists(len(LENS), 3, k_len, seed=31)
    copy_blocks, copy_counts, _ = old_lists(len(LENS), 3, k_len, seed=32)
    stale_blocks, stale_counts = copy_blocks.clone(), copy_counts.clone()
    on = [t.clone().to(device) for t in (blocks, counts, rows, copy_blocks, copy_counts, unit_lse, lse)]
    selector.select_into(*on[:3], torch.tensor(LENS, dtype=torch.int32, device=device), unit_lse=on[5], lse=on[6],
                         aggregate="sum", copy_to=(on[3], on[4]), use_kernel=use_kernel)
    got_blocks, got_counts, _, got_copy_blocks, got_copy_counts = (t.cpu() for t in on[:5])
    assert torch.equal(got_copy_blocks[rows], got_blocks[rows]) and torch.equal(got_copy_counts[rows], got_counts[rows])
    assert torch.equal(got_copy_blocks[~rows], stale_blocks[~rows])
    assert torch.equal(got_copy_counts[~rows], stale_counts[~rows])
    assert not torch.equal(got_blocks[rows], blocks[rows])  # the rows were written


def test_reference_breaks_ties_by_index():
    selector = BlockSelector("tokens", 48, 16, sink_blocks=0, local_blocks=0)
    scores = torch.tensor([[[1.0, 2.0, 2.0, 0.5, 2.0, 2.0]]])
    blocks, counts = selector.select(scores, torch.tensor([96]), 3)
    assert blocks.tolist() == [[[1, 2, 4]]] and counts.tolist() == [[3]]


def test_auto_dispatch_on_cpu_is_the_reference():
    selector = SELECTORS["tokens"]
    assert not selector.uses_kernel(torch.device("cpu"), 40)
    assert selector.uses_kernel(torch.device("cuda"), 4096)
    assert not BlockSelector("top_p", 0.9, BLOCK).uses_kernel(torch.device("cuda"), 40)
    unit_lse, lse = make_scores("random", 2, 2, 2, 40, seed=2)
    blocks, counts = torch.zeros(2, 2, 8, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32)
    rows = torch.ones(2, 2, dtype=torch.bool)
    lens = torch.tensor([640, 100])
    selector.select_into(blocks, counts, rows, lens, unit_lse=unit_lse, lse=lse, aggregate="max")
    want_blocks, want_counts = selector.select(block_scores(unit_lse, lse, 2, "max"), lens, 8)
    assert torch.equal(blocks, want_blocks) and torch.equal(counts, want_counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_graph_replay_follows_new_scores_and_lengths():
    selector = SELECTORS["ratio"]
    unit_lse, lse = make_scores("random", len(LENS), 2, 4, 40, seed=21)
    unit_lse, lse = unit_lse.cuda(), lse.cuda()
    lens = torch.tensor(LENS, dtype=torch.int32, device="cuda")
    rows = torch.ones(len(LENS), 2, dtype=torch.bool, device="cuda")
    k_len = selector.list_length(40 * BLOCK)
    blocks = torch.zeros(len(LENS), 2, k_len, dtype=torch.int32, device="cuda")
    counts = torch.zeros(len(LENS), 2, dtype=torch.int32, device="cuda")

    def call():
        selector.select_into(blocks, counts, rows, lens, unit_lse=unit_lse, lse=lse, aggregate="sum")

    call()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    new_lse, new_row_lse = make_scores("random", len(LENS), 2, 4, 40, seed=22)
    unit_lse.copy_(new_lse)
    lse.copy_(new_row_lse)
    lens.copy_(torch.tensor(LENS[::-1], dtype=torch.int32))
    graph.replay()
    want_blocks, want_counts = selector.select(block_scores(unit_lse, lse, 2, "sum"), lens, k_len)
    assert torch.equal(blocks, want_blocks) and torch.equal(counts, want_counts)


def test_rejects_other_modes_and_bad_shapes():
    blocks, counts = torch.zeros(1, 2, 4, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32)
    rows = torch.ones(1, 2, dtype=torch.bool)
    common = dict(aggregate="max", budget=0.5, block_size=16, sink_blocks=1, local_blocks=1)
    with pytest.raises(ValueError, match="modes"):
        select_blocks(torch.zeros(1, 4, 8), torch.zeros(1, 4), torch.tensor([64]), rows, blocks, counts,
                      mode="top_p", **common)
    with pytest.raises(ValueError, match="shapes"):
        select_blocks(torch.zeros(1, 3, 8), torch.zeros(1, 3), torch.tensor([64]), rows, blocks, counts,
                      mode="ratio", **common)


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the CPU cases ran in this process")
def test_cpu_cases_in_a_fresh_process():
    run_in_fresh_process(__file__)
