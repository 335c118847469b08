"""Quest's one-launch page scores (with the new key folded into its page) against the PyTorch reference.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (see triton_cpu); with CUDA the
same cases also run compiled on the GPU. The bounds must be equal bit for bit (min / max / copies); the
scores differ from the reference only in the order of float32 sums over the head dimension.
"""
import importlib

import torch

from triton_cpu import devices, fix_interpreter, interpreted, run_in_fresh_process  # sets TRITON_INTERPRET

import pytest  # noqa: E402

from sparsedecode.kernels import quest_page_scores, quest_page_scores_ref  # noqa: E402
from test_kernels import logical_layout, random_block_tables  # noqa: E402

INTERPRET = interpreted(importlib.import_module("sparsedecode.kernels.quest_pages")._quest_page_scores_kernel)
NEEDS_FRESH_PROCESS = not INTERPRET and not torch.cuda.is_available()
if INTERPRET:
    fix_interpreter()
DEVICES = devices(INTERPRET)


def make_case(seed, batch, kv_heads, group, dim, num_pages, page, dtype):
    """Random cache and bounds; ragged lengths: a key that starts a page, one inside a page, the last
    slot of the cache, an empty row (no update), a key starting the last page."""
    gen = torch.Generator().manual_seed(seed)
    capacity = num_pages * page + 3 * page  # a cache longer than the scored pages
    q = torch.randn(batch, kv_heads * group, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, capacity, dim, generator=gen).to(dtype)
    k_min = torch.randn(batch, kv_heads, num_pages, dim, generator=gen).to(dtype)
    k_max = k_min + torch.rand(batch, kv_heads, num_pages, dim, generator=gen).to(dtype)
    others = [page * 2 + 5, num_pages * page, 0, (num_pages - 1) * page + 1]
    lens = [page * 3 + 1] + [others[(seed + i) % len(others)] for i in range(batch - 1)]
    return q, k, k_min, k_max, torch.tensor(lens, dtype=torch.int32)


def make_paged_case(seed, batch, kv_heads, group, dim, block, max_blocks, page, dtype):
    """A key pool [NB, Hkv, block, D] and bounds per physical block [NB, Hkv, block // page, D] over
    random block tables (see test_kernels.random_block_tables); ragged lengths as in make_case, plus a
    key starting a block."""
    gen = torch.Generator().manual_seed(seed)
    capacity = block * max_blocks
    others = [page * 2 + 5, capacity, 0, capacity - page + 1, block + 1]
    lens = [page * 3 + 1] + [others[(seed + i) % len(others)] for i in range(batch - 1)]
    tables, num_blocks = random_block_tables(gen, lens, block, max_blocks)
    q = torch.randn(batch, kv_heads * group, dim, generator=gen).to(dtype)
    k = torch.randn(num_blocks, kv_heads, block, dim, generator=gen).to(dtype)
    k_min = torch.randn(num_blocks, kv_heads, block // page, dim, generator=gen).to(dtype)
    k_max = k_min + torch.rand(num_blocks, kv_heads, block // page, dim, generator=gen).to(dtype)
    return q, k, k_min, k_max, torch.tensor(lens, dtype=torch.int32), tables


def written_pages(lens, tables, block, page, num_blocks):
    """[NB, block // page] bool: the physical page that holds each row's newest key."""
    written = torch.zeros(num_blocks, block // page, dtype=torch.bool)
    for b, n in enumerate(lens.tolist()):
        if n:
            written[tables[b, (n - 1) // block], (n - 1) % block // page] = True
    return written


@pytest.mark.parametrize("block,page,max_blocks", [(16, 16, 5), (32, 8, 3), (64, 16, 4)])
def test_paged_reference_is_the_static_one_on_the_logical_layout(block, page, max_blocks):
    """The paged reference folds each new key into the page of its physical block (and nowhere else),
    and scores exactly as the static reference on the gathered keys and bounds."""
    q, k, k_min, k_max, lens, tables = make_paged_case(block + page, 5, 2, 3, 16, block, max_blocks, page,
                                                       torch.float32)
    paged_min, paged_max = k_min.clone(), k_max.clone()
    got = quest_page_scores_ref(q, k, paged_min, paged_max, lens, page, "sum", block_tables=tables)
    static_min, static_max = logical_layout(k_min, tables), logical_layout(k_max, tables)
    want = quest_page_scores_ref(q, logical_layout(k, tables), static_min, static_max, lens, page, "sum")
    assert got.shape == (5, 2, block * max_blocks // page) and torch.equal(got, want)
    assert torch.equal(logical_layout(paged_min, tables), static_min)
    assert torch.equal(logical_layout(paged_max, tables), static_max)
    changed = ((paged_min != k_min) | (paged_max != k_max)).any(-1).any(1)
    written = written_pages(lens, tables, block, page, k.shape[0])
    assert changed.any() and not (changed & ~written).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("aggregate", ["max", "sum"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 64, 5, 16), (3, 2, 4, 128, 70, 16), (2, 3, 8, 64, 129, 32),
                                   (4, 1, 7, 128, 64, 8)])
def test_matches_reference(device, dtype, aggregate, shape):
    batch, kv_heads, group, dim, num_pages, page = shape
    q, k, k_min, k_max, lens = make_case(sum(shape), batch, kv_heads, group, dim, num_pages, page, dtype)
    check_kernel(device, q, k, k_min, k_max, lens, page, aggregate)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block,page,max_blocks,aggregate", [(16, 16, 5, "max"), (32, 8, 3, "sum"),
                                                             (128, 16, 2, "max"), (32, 4, 20, "sum")])
def test_paged_matches_reference(device, dtype, block, page, max_blocks, aggregate):
    """Through shuffled, partly shared block tables: the new keys land in the right physical block and
    the scores of every logical page (more than one program's tile in the last case) are the reference's."""
    q, k, k_min, k_max, lens, tables = make_paged_case(block * page + max_blocks, 4, 2, 3, 32, block, max_blocks,
                                                       page, dtype)
    check_kernel(device, q, k, k_min, k_max, lens, page, aggregate, tables)


def check_kernel(device, q, k, k_min, k_max, lens, page, aggregate, tables=None):
    """The kernel (bounds poisoned copies of k_min / k_max, scores poisoned) against the reference."""
    ref_min, ref_max = k_min.clone(), k_max.clone()
    expected = quest_page_scores_ref(q, k, ref_min, ref_max, lens, page, aggregate, block_tables=tables)
    got_min, got_max = k_min.clone().to(device), k_max.clone().to(device)
    scores = torch.full(expected.shape, float("nan"), device=device)
    got = quest_page_scores(q.to(device), k.to(device), got_min, got_max, lens.to(device), page, aggregate, scores,
                            backend="triton", block_tables=None if tables is None else tables.to(device)).cpu()
    assert torch.equal(got_min.cpu(), ref_min) and torch.equal(got_max.cpu(), ref_max)
    assert not torch.equal(ref_min, k_min) or not torch.equal(ref_max, k_max)  # some page was updated
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(scale))


def test_reference_folds_the_new_key():
    """The reference itself: a key starting a page replaces both bounds, one inside widens them, an
    empty row changes nothing; scores are relu(q).max + min(q, 0).min with the group's max."""
    q, k, k_min, k_max, _ = make_case(0, 3, 1, 2, 4, 4, 4, torch.float32)
    lens = torch.tensor([5, 7, 0], dtype=torch.int32)  # page 1 starts at 4: position 4 starts it, 6 not
    before_min, before_max = k_min.clone(), k_max.clone()
    scores = quest_page_scores_ref(q, k, k_min, k_max, lens, 4, "max")
    assert torch.equal(k_min[0, 0, 1], k[0, 0, 4]) and torch.equal(k_max[0, 0, 1], k[0, 0, 4])
    assert torch.equal(k_min[1, 0, 1], torch.minimum(before_min[1, 0, 1], k[1, 0, 6]))
    assert torch.equal(k_max[1, 0, 1], torch.maximum(before_max[1, 0, 1], k[1, 0, 6]))
    assert torch.equal(k_min[2], before_min[2]) and torch.equal(k_max[2], before_max[2])
    unchanged = [0, 2, 3]
    assert torch.equal(k_min[:2, :, unchanged], before_min[:2, :, unchanged])
    bound = (q[:, :, None, :] * k_min[:, 0, None] ).maximum(q[:, :, None, :] * k_max[:, 0, None]).sum(-1)
    torch.testing.assert_close(scores[:, 0], bound.amax(1))


def test_rejects_bad_arguments():
    q, k, k_min, k_max, lens = make_case(1, 1, 2, 2, 16, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="aggregation"):
        quest_page_scores(q, k, k_min, k_max, lens, 4, "mean")
    with pytest.raises(ValueError, match="bad shapes"):
        quest_page_scores(q, k, k_min[:, :1], k_max, lens, 4, "max")
    with pytest.raises(ValueError, match="dtype"):
        quest_page_scores(q, k, k_min.double(), k_max.double(), lens, 4, "max")
    q, k, k_min, k_max, lens, tables = make_paged_case(1, 2, 2, 2, 16, 16, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="bad shapes"):  # bounds per logical page, not per physical block
        quest_page_scores(q, k, k_min[:2].repeat(1, 1, 3, 1), k_max[:2].repeat(1, 1, 3, 1), lens, 4, "max",
                          block_tables=tables)
    with pytest.raises(ValueError, match="bad shapes"):  # pages that straddle blocks
        quest_page_scores(q, k, k_min, k_max, lens, 5, "max", block_tables=tables)


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the CPU cases ran in this process")
def test_cpu_cases_in_a_fresh_process():
    run_in_fresh_process(__file__)
