"""The fused Triton sparse decode kernel against the PyTorch reference.

Without CUDA the Triton path runs in the interpreter on CPU tensors (TRITON_INTERPRET=1 has to be set
before triton is imported); with CUDA the same tests run the compiled kernel on the GPU.
"""
import contextlib
from unittest import mock

import torch

from triton_cpu import devices, fix_interpreter, interpreted, run_in_fresh_process  # sets TRITON_INTERPRET

import pytest  # noqa: E402
import triton  # noqa: E402

from sparsedecode.kernels import sparse_decode_attention, sparse_decode_attention_ref  # noqa: E402
from sparsedecode.kernels.sparse_decode import LAUNCH, Launch, chunk_units  # noqa: E402
from sparsedecode.kernels import sparse_decode as sd  # noqa: E402

# Triton picks interpreter or compiler when it decorates a function: if a test module imported triton
# before this one, the interpreter cannot run in this process and the CPU cases run in a fresh one.
INTERPRET = interpreted(sd._partial_kernel)
NEEDS_FRESH_PROCESS = not INTERPRET and not torch.cuda.is_available()

if INTERPRET:
    fix_interpreter()  # two bugs of triton 3.6's interpreter (see triton_cpu)

DEVICES = devices(INTERPRET)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}
# log2(0) of units with no visible token is -inf by design; the interpreter's numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


def make_inputs(device, dtype, batch, kv_heads, group, head_dim, capacity, lens, seed, layers=1):
    """q and a strided layer view of a [layers, B, Hkv, T, D] cache (the engine's layout)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen).to(device, dtype)
    cache_shape = (layers, batch, kv_heads, capacity, head_dim)
    k = torch.randn(cache_shape, generator=gen).to(device, dtype)[layers - 1]
    v = torch.randn(cache_shape, generator=gen).to(device, dtype)[layers - 1]
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=device), gen


def random_lists(gen, batch, kv_heads, width, num_units, device):
    """Lists with out-of-range entries (< 0, past the sequence, past the capacity), duplicates and
    counts from 0 to beyond the list width."""
    lists = torch.randint(-2, num_units + 3, (batch, kv_heads, width), generator=gen, dtype=torch.int32)
    lists[..., -1] = lists[..., 0]  # a duplicate in every row
    counts = torch.randint(0, width + 3, (batch, kv_heads), generator=gen, dtype=torch.int32)
    return lists.to(device), counts.to(device)


def sorted_lists_of(gen, lens, kv_heads, width, unit_size, num_units, device):
    """Lists that keep the `sorted_lists` promise (unique, ascending, below ceil(len / unit_size)), padded
    with the sentinel `num_units`, and their counts."""
    lists = torch.full((len(lens), kv_heads, width), num_units, dtype=torch.int32)
    counts = torch.zeros(len(lens), kv_heads, dtype=torch.int32)
    for b, length in enumerate(lens):
        held = triton.cdiv(length, unit_size)
        for h in range(kv_heads):
            n = min(width, held, int(torch.randint(1, width + 1, (1,), generator=gen)))
            lists[b, h, :n] = torch.randperm(held, generator=gen)[:n].sort().values
            counts[b, h] = n
    return lists.to(device), counts.to(device)


@contextlib.contextmanager
def poisoned():
    """Cached scratch and every tensor the call allocates start as NaN (or -7): nothing stale passes."""
    with torch.inference_mode():  # scratch first allocated by the engine is an inference tensor
        for buffers in sd._SCRATCH.values():
            for buf in buffers.values():
                buf.fill_(float("nan") if buf.is_floating_point() else -7)
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    with mock.patch.object(torch, "empty", poisoned_empty):
        yield


def run_both(q, k, v, lens, unit_size, lists=None, counts=None, full=None, with_lse=True, chunk_tokens=None,
             work_items=None, launch=LAUNCH, sorted_lists=False, block_tables=None, scored_rows=None):
    """Kernel and reference on the same inputs; unit_lse poisoned with NaN before the kernel."""
    scale = q.shape[-1] ** -0.5
    capacity = k.shape[2] * (1 if block_tables is None else block_tables.shape[1])
    shape = (q.shape[0], q.shape[1], capacity // unit_size)
    unit_lse = torch.full(shape, float("nan"), device=q.device) if with_lse else None
    ref_lse = torch.empty(shape, device=q.device) if with_lse else None
    with poisoned():
        out, lse = sparse_decode_attention(q, k, v, lens, scale, unit_size, lists, counts, full, unit_lse,
                                           backend="triton", chunk_tokens=chunk_tokens, work_items=work_items,
                                           launch=launch, sorted_lists=sorted_lists, block_tables=block_tables,
                                           scored_rows=scored_rows)
    ref_out, ref = sparse_decode_attention_ref(q, k, v, lens, scale, unit_size, lists, counts, full, ref_lse,
                                               block_tables=block_tables, scored_rows=scored_rows)
    return (out, lse, unit_lse), (ref_out, ref, ref_lse)


def assert_close_inf(actual, expected, **tol):
    """Equal -inf placement, no NaN, finite values close."""
    assert not actual.isnan().any()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite)
    assert torch.equal(actual[~finite], expected[~finite])
    torch.testing.assert_close(actual[finite], expected[finite], **tol)


def check(got, want, dtype):
    out, lse, unit_lse = got
    ref_out, ref_lse, ref_unit_lse = want
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not out.float().isnan().any()
    torch.testing.assert_close(out.float(), ref_out.float(), **TOL[dtype])
    lse_tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    assert_close_inf(lse, ref_lse, **lse_tol)
    if unit_lse is not None:
        assert_close_inf(unit_lse, ref_unit_lse, **lse_tol)


# (group, head_dim, unit_size, dtype): GQA 1/2/4/8, d 64/128, units 16/64, plus sub-unit tiles (U=128 > tile).
# test_hybrid runs each shape in the other dtype, so every shape meets both dtypes across the two tests.
SHAPES = [(1, 64, 16, torch.bfloat16), (2, 128, 64, torch.float32), (4, 64, 64, torch.bfloat16),
          (8, 128, 16, torch.float32), (4, 128, 128, torch.bfloat16)]
OTHER_DTYPE = {torch.bfloat16: torch.float32, torch.float32: torch.bfloat16}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,head_dim,unit_size,dtype", SHAPES)
def test_dense(device, dtype, group, head_dim, unit_size):
    capacity = 4 * max(unit_size, 64)
    lens = [capacity, capacity - unit_size // 2 - 3, 5, 0]  # ragged, partial units, an empty sequence
    q, k, v, lens, _ = make_inputs(device, dtype, 4, 2, group, head_dim, capacity, lens, seed=group + head_dim)
    got, want = run_both(q, k, v, lens, unit_size, chunk_tokens=2 * max(unit_size, 64))
    check(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,head_dim,unit_size,dtype", [(*shape, OTHER_DTYPE[dtype]) for *shape, dtype in SHAPES])
def test_hybrid(device, dtype, group, head_dim, unit_size):
    """Mixed full and list rows, ragged lengths, messy lists, unit_lse emission."""
    batch, kv_heads, num_units = 3, 2, 6
    capacity = num_units * unit_size
    lens = [capacity, capacity - unit_size - 5, unit_size + 1]
    q, k, v, lens, gen = make_inputs(device, dtype, batch, kv_heads, group, head_dim, capacity, lens,
                                     seed=7 * group + unit_size, layers=2)
    lists, counts = random_lists(gen, batch, kv_heads, num_units + 2, num_units, device)
    full = torch.tensor([[True, False], [False, False], [False, True]], device=device)
    got, want = run_both(q, k, v, lens, unit_size, lists, counts, full, chunk_tokens=max(unit_size, 64))
    check(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unit_size", [16, 64])
def test_lists_without_full_rows(device, unit_size):
    """full_rows=None: every row follows its list; lists longer than the context; default chunking."""
    batch, kv_heads, group, head_dim = 2, 2, 4, 64
    capacity = 8 * unit_size
    q, k, v, lens, gen = make_inputs(device, torch.float32, batch, kv_heads, group, head_dim, capacity,
                                     [capacity - 1, 3 * unit_size], seed=unit_size)
    lists, counts = random_lists(gen, batch, kv_heads, 12, 8, device)
    got, want = run_both(q, k, v, lens, unit_size, lists, counts)
    check(got, want, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_many_chunks_per_row(device):
    """More chunks in a row than the merge takes in one step (8 at d=128 with this launch: 40 chunks
    merged in 5 steps)."""
    unit_size, capacity = 64, 64 * 80
    launch = Launch(merge_elements=8 * 128)
    q, k, v, lens, _ = make_inputs(device, torch.float32, 2, 1, 2, 128, capacity, [capacity, capacity - 40], seed=3)
    lists = torch.arange(80, dtype=torch.int32, device=device).flip(0).expand(2, 1, 80).contiguous()
    counts = torch.tensor([[80], [60]], dtype=torch.int32, device=device)
    assert chunk_units(unit_size, unit_size, launch.tile_tokens(128)) == 2  # 40 chunks per row
    got, want = run_both(q, k, v, lens, unit_size, lists, counts, torch.tensor([[False], [True]], device=device),
                         chunk_tokens=unit_size, launch=launch)
    check(got, want, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("unit_size", [16, 64])
@pytest.mark.parametrize("sized_on_device", [False, True])
def test_list_of_all_units_is_bit_identical_to_full(device, dtype, unit_size, sized_on_device):
    """A list of the units 0..n-1 (any order) gives exactly the bits of a full row / of dense."""
    batch, kv_heads, group, head_dim = 2, 2, 4, 128
    capacity = 10 * unit_size
    lens_list = [capacity - unit_size // 2, 4 * unit_size + 1]
    q, k, v, lens, gen = make_inputs(device, dtype, batch, kv_heads, group, head_dim, capacity, lens_list, seed=11)
    width = 12
    lists = torch.full((batch, kv_heads, width), -1, dtype=torch.int32)
    counts = torch.zeros(batch, kv_heads, dtype=torch.int32)
    for b, n in enumerate(triton.cdiv(x, unit_size) for x in lens_list):
        lists[b, 0, :n] = torch.arange(n)
        lists[b, 1, :n] = torch.randperm(n, generator=gen)
        counts[b] = n + 2  # the budget exceeds the context: trailing -1 entries are skipped
    lists, counts = lists.to(device), counts.to(device)
    full = torch.tensor([[False, False], [True, False]], device=device)
    chunk = None if sized_on_device else 2 * max(unit_size, 64)  # several chunks per row
    scale = head_dim**-0.5
    results = []
    for args in [(None, None, None), (lists, counts, full), (lists, counts, None)]:
        unit_lse = torch.empty(batch, group * kv_heads, capacity // unit_size, device=device)
        out, lse = sparse_decode_attention(q, k, v, lens, scale, unit_size, *args, unit_lse, backend="triton",
                                           chunk_tokens=chunk, work_items=3)
        results.append((out, lse, unit_lse))
    for out, lse, unit_lse in results[1:]:
        assert torch.equal(out, results[0][0])
        assert torch.equal(lse, results[0][1])
        assert torch.equal(unit_lse, results[0][2])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(device):
    """Rows with nothing to attend: out 0, lse -inf, no NaN; their units stay -inf."""
    batch, kv_heads, group, head_dim, unit_size = 2, 2, 2, 64, 16
    capacity = 4 * unit_size
    q, k, v, lens, _ = make_inputs(device, torch.bfloat16, batch, kv_heads, group, head_dim, capacity,
                                   [capacity, 20], seed=5)
    lists = torch.tensor([[[1, 2], [0, 0]], [[-1, 9], [3, 2]]], dtype=torch.int32, device=device)
    counts = torch.tensor([[2, 0], [2, 2]], dtype=torch.int32, device=device)  # row (1,1): units past len 20
    got, want = run_both(q, k, v, lens, unit_size, lists, counts)
    check(got, want, torch.bfloat16)
    out, lse, unit_lse = got
    for b, h in [(0, 1), (1, 0), (1, 1)]:
        heads = slice(h * group, (h + 1) * group)
        assert torch.equal(out[b, heads].float(), torch.zeros_like(out[b, heads].float()))
        assert torch.equal(lse[b, heads], torch.full_like(lse[b, heads], float("-inf")))
        assert torch.equal(unit_lse[b, heads], torch.full_like(unit_lse[b, heads], float("-inf")))


@pytest.mark.parametrize("device", DEVICES)
def test_int64_lists_and_zero_width(device):
    q, k, v, lens, gen = make_inputs(device, torch.float32, 2, 2, 2, 64, 128, [128, 50], seed=4)
    lists, counts = random_lists(gen, 2, 2, 3, 8, device)
    full = torch.tensor([[False, True], [False, False]], device=device)
    check(*run_both(q, k, v, lens, 16, lists.long(), counts.long(), full), torch.float32)
    empty = torch.zeros(2, 2, 0, dtype=torch.int32, device=device)
    check(*run_both(q, k, v, lens, 16, empty, counts, full), torch.float32)
    check(*run_both(q, k, v, lens, 16, empty, counts), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_and_head_dim_256(device):
    q, k, v, lens, gen = make_inputs(device, torch.float16, 2, 1, 2, 256, 256, [256, 77], seed=9)
    lists, counts = random_lists(gen, 2, 1, 5, 4, device)
    got, want = run_both(q, k, v, lens, 64, lists, counts, torch.tensor([[True], [False]], device=device))
    check(got, want, torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_graph_replay_follows_new_lists_and_lengths():
    """Captured once, replayed with new lists, counts, roles and lengths written in place."""
    device, unit_size, capacity = "cuda", 64, 2048
    q, k, v, lens, gen = make_inputs(device, torch.bfloat16, 2, 8, 4, 128, capacity, [2000, 1500], seed=21)
    lists, counts = random_lists(gen, 2, 8, 16, capacity // unit_size, device)
    full = torch.zeros(2, 8, dtype=torch.bool, device=device)
    unit_lse = torch.empty(2, 32, capacity // unit_size, device=device)

    def call():
        return sparse_decode_attention(q, k, v, lens, 0.088, unit_size, lists, counts, full, unit_lse)

    call()  # compiles the kernels and allocates the scratch outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = call()
    for step in range(3):
        new_lists, new_counts = random_lists(gen, 2, 8, 16, capacity // unit_size, device)
        lists.copy_(new_lists)
        counts.copy_(new_counts)
        full.copy_(torch.rand(2, 8, generator=gen) < 0.3)
        lens.copy_(torch.tensor([2048 - 100 * step, 700 + step], dtype=torch.int32))
        graph.replay()
        want_lse = torch.empty_like(unit_lse)
        want_out, want = sparse_decode_attention_ref(q, k, v, lens, 0.088, unit_size, lists, counts, full, want_lse)
        check((out, lse, unit_lse), (want_out, want, want_lse), torch.bfloat16)


def test_chunk_bounds():
    """Whole 64-token tiles per chunk, at least one, whatever is asked."""
    assert chunk_units(256, 64, 64) * 64 == 256 and chunk_units(256, 16, 64) * 16 == 256
    assert chunk_units(16, 16, 64) == 4  # at least one 64-token tile
    assert chunk_units(1000, 64, 64) == 15 and chunk_units(1000, 16, 128) == 56


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("work_items", [1, 5, None, 10_000])
def test_chunks_sized_from_the_lengths(device, work_items):
    """Chunks sized on the device from the units the call visits: one item per row up to many chunks
    per row (a long full row next to short list rows), always the reference's result."""
    unit_size, head_dim, kv_heads = 16, 64, 3
    capacity = 48 * unit_size
    q, k, v, lens, gen = make_inputs(device, torch.float32, 2, kv_heads, 2, head_dim, capacity,
                                     [capacity - 7, 20 * unit_size + 3], seed=13)
    lists, counts = random_lists(gen, 2, kv_heads, 24, 48, device)
    full = torch.tensor([[True, False, False], [False, False, True]], device=device)
    for args in [(), (lists, counts, full)]:
        check(*run_both(q, k, v, lens, unit_size, *args, work_items=work_items), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("launch", [Launch(tile_elements=16384, merge_elements=8192, num_warps=8, num_stages=4),
                                    Launch(tile_elements=1024, merge_elements=256, items_per_sm=1, min_chunk_tokens=16)])
def test_launch_settings_compute_the_same_op(device, launch):
    """Other tiles, merge steps, warps and chunk sizes: still the reference's result (bf16, ragged)."""
    unit_size, head_dim = 32, 64
    capacity = 20 * unit_size
    q, k, v, lens, gen = make_inputs(device, torch.bfloat16, 2, 2, 4, head_dim, capacity,
                                     [capacity - 5, 9 * unit_size + 1], seed=17)
    lists, counts = random_lists(gen, 2, 2, 12, 20, device)
    full = torch.tensor([[True, False], [False, True]], device=device)
    for args in [(), (lists, counts, full)]:
        check(*run_both(q, k, v, lens, unit_size, *args, launch=launch), torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("work_items", [3, 12, 17])
def test_balanced_chunks_compute_the_same_op(device, work_items):
    """A call without lists cuts a row of 4 or more chunks into the nearest whole number of chunks of the
    call's size, so rows get chunks of their own sizes: still the reference's result. (17 items: chunks of
    9 units, the 40-unit rows in 4 chunks of 10, the 24-unit row left at 9.) With lists, nothing changes."""
    unit_size, head_dim = 16, 32
    capacity = 40 * unit_size
    lens_list = [capacity, 23 * unit_size + 5, 9 * unit_size]
    q, k, v, lens, gen = make_inputs(device, torch.float32, 3, 2, 2, head_dim, capacity, lens_list, seed=29)
    lists, counts = sorted_lists_of(gen, lens_list, 2, 30, unit_size, 40, device)
    full = torch.tensor([[True, False], [False, True], [False, False]], device=device)
    launch = Launch(tile_elements=512, min_chunk_tokens=16)
    for args in [(), (lists, counts, full)]:
        check(*run_both(q, k, v, lens, unit_size, *args, work_items=work_items, launch=launch, sorted_lists=bool(args)),
              torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scored_rows_limit_the_unit_scores(device, seed):
    """With scored_rows only those rows' query heads get per-unit log-sum-exp (the others -inf, as in the
    reference); the attention output and lse stay the op's, and a scored row's units are the bits of a
    call that scores every row. Random shapes, lists and full rows."""
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(2, 4, (1,), generator=gen))
    group, unit_size, head_dim = [2, 4][seed % 2], [16, 64][seed % 2], 64
    capacity = int(torch.randint(3, 10, (1,), generator=gen)) * unit_size
    lens_list = [int(torch.randint(1, capacity + 1, (1,), generator=gen)) for _ in range(batch)]
    q, k, v, lens, gen = make_inputs(device, torch.bfloat16, batch, kv_heads, group, head_dim, capacity,
                                     lens_list, seed=seed)
    lists, counts = sorted_lists_of(gen, lens_list, kv_heads, 6, unit_size, capacity // unit_size, device)
    full = (torch.rand(batch, kv_heads, generator=gen) < 0.3).to(device)
    scored = torch.rand(batch, kv_heads, generator=gen) < 0.5
    scored[0, 0], scored[-1, -1] = True, False  # both kinds in every case
    scored = scored.to(device)
    got, want = run_both(q, k, v, lens, unit_size, lists, counts, full, sorted_lists=True, scored_rows=scored)
    check(got, want, torch.bfloat16)
    unscored = ~scored.repeat_interleave(group, dim=1)
    assert torch.isneginf(got[2][unscored]).all() and torch.isfinite(got[2][~unscored]).any()
    every, _ = run_both(q, k, v, lens, unit_size, lists, counts, full, sorted_lists=True)
    assert torch.equal(got[0], every[0]) and torch.equal(got[1], every[1])
    assert torch.equal(got[2][~unscored], every[2][~unscored])
    wrong = scored.t().contiguous().repeat(1, 2)  # a [Hkv, 2B] mask: the error names the shape it needs
    args = (q, k, v, lens, q.shape[-1] ** -0.5, unit_size, lists, counts, full, torch.empty_like(got[2]))
    with pytest.raises(ValueError, match=rf"scored_rows must be \[{batch}, {kv_heads}\] bool"):
        sparse_decode_attention(*args, backend="triton", sorted_lists=True, scored_rows=wrong)
    with pytest.raises(ValueError, match=rf"scored_rows must be \[{batch}, {kv_heads}\] bool"):
        sparse_decode_attention_ref(*args, scored_rows=wrong)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unit_size", [16, 64])
def test_sorted_lists_skip_the_plan_with_the_same_bits(device, unit_size):
    """Valid ascending lists (as the selection kernels write them) read as given give exactly the bits
    of the planned path, which gives the reference's result; full rows and ragged lengths included."""
    batch, kv_heads, group, head_dim, width = 3, 2, 4, 64, 9
    capacity = 24 * unit_size
    lens_list = [capacity - 3, 5 * unit_size + 1, unit_size // 2]
    q, k, v, lens, gen = make_inputs(device, torch.bfloat16, batch, kv_heads, group, head_dim, capacity,
                                     lens_list, seed=19)
    lists, counts = sorted_lists_of(gen, lens_list, kv_heads, width, unit_size, capacity // unit_size, device)
    full = torch.tensor([[True, False], [False, False], [False, True]], device=device)
    scale = head_dim**-0.5
    results = []
    for sorted_lists in (False, True):
        unit_lse = torch.empty(batch, group * kv_heads, capacity // unit_size, device=device)
        out, lse = sparse_decode_attention(q, k, v, lens, scale, unit_size, lists, counts, full, unit_lse,
                                           backend="triton", work_items=5, sorted_lists=sorted_lists)
        results.append((out, lse, unit_lse))
    for planned, given in zip(results[0], results[1]):
        assert torch.equal(planned, given)
    ref_lse = torch.empty_like(results[1][2])
    ref_out, ref = sparse_decode_attention_ref(q, k, v, lens, scale, unit_size, lists, counts, full, ref_lse)
    check(results[1], (ref_out, ref, ref_lse), torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unit_size", [16, 64])
def test_sorted_lists_are_visited_in_their_order(device, unit_size):
    """Lists read as given are visited in their order: the same units copied to other places of
    another cache (as a KV offload pool holds them) and listed in the same order give the same bits,
    unit scores included; ragged lengths, a partial newest unit and a budget past the context."""
    batch, kv_heads, group, head_dim, width = 2, 2, 4, 64, 6
    capacity, slots = 20 * unit_size, 8
    lens_list = [capacity - unit_size // 2 - 1, 3 * unit_size + 2]
    q, k, v, lens, gen = make_inputs(device, torch.bfloat16, batch, kv_heads, group, head_dim, capacity,
                                     lens_list, seed=23)
    lists = torch.full((batch, kv_heads, width), capacity // unit_size, dtype=torch.int32)
    counts = torch.zeros(batch, kv_heads, dtype=torch.int32)
    pool_k = torch.zeros(batch, kv_heads, slots * unit_size, head_dim, dtype=torch.bfloat16, device=device)
    pool_v = torch.zeros_like(pool_k)
    pool_lists = torch.full((batch, kv_heads, slots), slots, dtype=torch.int32)
    # the pool's length ends inside its last slot where the sequence ends inside its newest unit
    pool_lens = torch.tensor([(slots - 1) * unit_size + (n - 1) % unit_size + 1 for n in lens_list],
                             dtype=torch.int32, device=device)
    for b, length in enumerate(lens_list):
        held = triton.cdiv(length, unit_size)
        for h in range(kv_heads):
            n = min(width - 1, held - 1)
            units = torch.cat([torch.randperm(held - 1, generator=gen)[:n].sort().values, torch.tensor([held - 1])])
            places = torch.cat([torch.randperm(slots - 1, generator=gen)[:n], torch.tensor([slots - 1])])
            lists[b, h, : n + 1], pool_lists[b, h, : n + 1], counts[b, h] = units, places, n + 1
            for unit, place in zip(units.tolist(), places.tolist()):
                src, dst = slice(unit * unit_size, (unit + 1) * unit_size), slice(place * unit_size, (place + 1) * unit_size)
                pool_k[b, h, dst], pool_v[b, h, dst] = k[b, h, src], v[b, h, src]
    lists, counts, pool_lists = lists.to(device), counts.to(device), pool_lists.to(device)
    scale = head_dim**-0.5
    unit_lse = torch.empty(batch, group * kv_heads, capacity // unit_size, device=device)
    pool_lse = torch.empty(batch, group * kv_heads, slots, device=device)
    out, lse = sparse_decode_attention(q, k, v, lens, scale, unit_size, lists, counts, None, unit_lse,
                                       backend="triton", work_items=3, sorted_lists=True)
    pool_out, pool_total = sparse_decode_attention(q, pool_k, pool_v, pool_lens, scale, unit_size, pool_lists, counts,
                                                   None, pool_lse, backend="triton", work_items=3, sorted_lists=True)
    assert torch.equal(pool_out, out) and torch.equal(pool_total, lse)
    heads = torch.arange(group * kv_heads, device=device) // group
    for b in range(batch):
        places, units = pool_lists[b, heads, :width].long(), lists[b, heads].long()  # [Hq, width]
        listed = torch.arange(width, device=device) < counts[b, heads, None].to(device)
        assert torch.equal(pool_lse[b].gather(1, places.clamp(max=slots - 1))[listed],
                           unit_lse[b].gather(1, units.clamp(max=capacity // unit_size - 1))[listed])


def random_block_tables(gen, lens, page, max_blocks, spare=3):
    """Block tables [B, max_blocks] int32 and the pool's block count: physical blocks shuffled, every
    sequence of more than one block starting with the shared block 0 (a common prefix), which every
    entry past a sequence's length also names; a sequence's last block is its own; `spare` unused."""
    need = [triton.cdiv(n, page) for n in lens]
    own = [n - (n > 1) for n in need]
    num_blocks = 1 + sum(own) + spare
    ids = iter((torch.randperm(num_blocks - 1, generator=gen) + 1).tolist())
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    for b, n in enumerate(need):
        for j in range(n > 1, n):
            tables[b, j] = next(ids)
    return tables, num_blocks


def logical_layout(pool, tables):
    """[B, Hkv, MB * P, D]: token t of sequence b from pool[tables[b, t // P], :, t % P]."""
    page = pool.shape[2]
    t = torch.arange(tables.shape[1] * page, device=pool.device)
    return pool[tables[:, t // page].long(), :, t % page].transpose(1, 2).contiguous()


def make_paged_inputs(device, dtype, batch, kv_heads, group, head_dim, page, max_blocks, lens, seed):
    """q, pools k / v [NB, Hkv, P, D] over random block tables, the tables, lengths and the generator."""
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = random_block_tables(gen, lens, page, max_blocks)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(num_blocks, kv_heads, page, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(num_blocks, kv_heads, page, head_dim, generator=gen).to(device, dtype)
    return q, k, v, tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device), gen


# (page, unit_size, max_blocks): units smaller than, equal to and larger than the page.
PAGED = [(16, 8, 9), (32, 32, 5), (16, 64, 8), (64, 16, 3)]


@pytest.mark.parametrize("page,unit_size,max_blocks", PAGED)
def test_paged_reference_is_the_static_one_on_the_logical_layout(page, unit_size, max_blocks):
    """Dense, hybrid and list-only calls on a paged cache give exactly the static reference's bits on
    the gathered cache (ragged lengths inside a page, an empty sequence, a full one)."""
    capacity = page * max_blocks
    lens = [capacity - page // 2 - 1, page + 3, 0, capacity]
    q, k, v, tables, lens, gen = make_paged_inputs("cpu", torch.float32, 4, 2, 2, 32, page, max_blocks, lens, seed=page)
    num_units = capacity // unit_size
    lists, counts = random_lists(gen, 4, 2, num_units + 1, num_units, "cpu")
    full = torch.rand(4, 2, generator=gen) < 0.4
    static_k, static_v = logical_layout(k, tables), logical_layout(v, tables)
    for args in [(None, None, None), (lists, counts, full), (lists, counts, None)]:
        paged_lse, static_lse = torch.full((2, 4, 4, num_units), float("nan")).unbind(0)
        paged = sparse_decode_attention_ref(q, k, v, lens, 0.2, unit_size, *args, paged_lse, block_tables=tables)
        static = sparse_decode_attention_ref(q, static_k, static_v, lens, 0.2, unit_size, *args, static_lse)
        assert torch.equal(paged[0], static[0]) and torch.equal(paged[1], static[1])
        assert torch.equal(paged_lse, static_lse)
        auto = sparse_decode_attention(q, k, v, lens, 0.2, unit_size, *args, block_tables=tables)
        assert torch.equal(auto[0], static[0]) and torch.equal(auto[1], static[1])
    seen = []  # an observer of the reads sees the logical layout
    with sd.record_attention_reads(lambda *call: seen.append(call)):
        sparse_decode_attention(q, k, v, lens, 0.2, unit_size, block_tables=tables)
    assert torch.equal(seen[0][1], static_k) and torch.equal(seen[0][2], static_v)


def test_paged_reference_bits_do_not_depend_on_the_unit_size():
    """Dense calls, full rows and lists of every unit at units of 16 to 128 tokens all give the bits of a
    dense call at 64-token units: the reference's sums run over the gathered pages whatever the unit size (a
    float sum over a row padded further with -inf can round differently). A method attending with its own
    block size to a list of every block is then dense, bit for bit. Lengths end inside a 64-token unit, and
    many rows make a rounding difference likely if the padded length changed."""
    batch, kv_heads, page, max_blocks = 8, 8, 16, 64
    lens = [705 + b for b in range(batch)]
    q, k, v, tables, lens, _ = make_paged_inputs("cpu", torch.float32, batch, kv_heads, 8, 64, page, max_blocks, lens,
                                                 seed=5)
    want = sparse_decode_attention_ref(q, k, v, lens, 0.125, 64, block_tables=tables)
    for unit_size in (16, 32, 128):
        lists = torch.arange(page * max_blocks // unit_size, dtype=torch.int32).expand(batch, kv_heads, -1)
        counts = (-(-lens // unit_size))[:, None].expand(batch, kv_heads).to(torch.int32)
        cases = {"dense": (None, None, None), "lists": (lists, counts, None),
                 "full rows": (lists, counts, torch.ones(batch, kv_heads, dtype=torch.bool))}
        for case, args in cases.items():
            got = sparse_decode_attention_ref(q, k, v, lens, 0.125, unit_size, *args, block_tables=tables)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"{case}, {unit_size}-token units"


# (page, unit_size, max_blocks, dtype, launch): units inside a page, a page each, over several pages,
# and over several tiles of the partial kernel (32-token tiles at d=32).
PAGED_TRITON = [(16, 8, 9, torch.bfloat16, LAUNCH), (32, 32, 5, torch.float32, LAUNCH),
                (16, 64, 8, torch.bfloat16, Launch(tile_elements=1024, min_chunk_tokens=16)),
                (64, 16, 3, torch.float32, LAUNCH)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page,unit_size,max_blocks,dtype,launch", PAGED_TRITON)
def test_paged_cache_matches_the_reference_and_the_static_bits(device, page, unit_size, max_blocks, dtype, launch):
    """Through shuffled, partly shared block tables the kernel computes the paged reference, and gives
    exactly the bits of the static kernel on the gathered cache: dense, hybrid, list-only and sorted
    lists; ragged lengths inside a page, an empty sequence, a full one; several chunks per row."""
    batch, kv_heads, group, head_dim = 4, 2, 2, 32
    capacity = page * max_blocks
    num_units = capacity // unit_size
    lens_list = [capacity - page // 2 - 1, page + 3, 0, capacity]
    q, k, v, tables, lens, gen = make_paged_inputs(device, dtype, batch, kv_heads, group, head_dim, page,
                                                   max_blocks, lens_list, seed=page + unit_size)
    lists, counts = random_lists(gen, batch, kv_heads, num_units + 1, num_units, device)
    given, given_counts = sorted_lists_of(gen, lens_list, kv_heads, 4, unit_size, num_units, device)
    full = (torch.rand(batch, kv_heads, generator=gen) < 0.4).to(device)
    static_k, static_v = logical_layout(k, tables), logical_layout(v, tables)
    for args, sorted_lists in [((), False), ((lists, counts, full), False), ((lists, counts), False),
                               ((given, given_counts, full), True)]:
        kwargs = dict(work_items=5, launch=launch, sorted_lists=sorted_lists)
        got, want = run_both(q, k, v, lens, unit_size, *args, block_tables=tables, **kwargs)
        check(got, want, dtype)
        static, _ = run_both(q, static_k, static_v, lens, unit_size, *args, **kwargs)
        for paged_result, static_result in zip(got, static):
            assert torch.equal(paged_result, static_result)


@pytest.mark.parametrize("device", DEVICES)
def test_blocks_past_element_2_31_of_a_pool_are_read_where_they_are(device):
    """A pool of 2**31 elements or more is addressed with 64-bit offsets (smaller ones with 32-bit): the
    blocks at its end, past element 2**31, are read and not a wrapped-around address. K and V are one
    tensor of 4 GiB (only the blocks in the table are written)."""
    page, head_dim = 16, 16
    num_blocks = 2**31 // (page * head_dim) + 4
    pool = torch.empty(num_blocks, 1, page, head_dim, dtype=torch.float16, device=device)
    tables = torch.tensor([[num_blocks - 1, 3, num_blocks - 2]], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(11)
    pool[tables[0].long()] = torch.randn(3, 1, page, head_dim, generator=gen).to(device, torch.float16)
    q = torch.randn(1, 2, head_dim, generator=gen).to(device, torch.float16)
    lens = torch.tensor([3 * page - 5], dtype=torch.int32, device=device)
    got, want = run_both(q, pool, pool, lens, 16, block_tables=tables)
    check(got, want, torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_slots_past_the_length_may_hold_nan(device):
    """A page's slots past the sequence's length hold whatever the pool had (NaN here): the result is
    that of a pool holding zeros there."""
    page, unit_size, head_dim = 32, 32, 64
    lens_list = [3 * page - 7, page + 1]
    q, k, v, tables, lens, gen = make_paged_inputs(device, torch.bfloat16, 2, 2, 4, head_dim, page, 4, lens_list,
                                                   seed=23)
    lists, counts = sorted_lists_of(gen, lens_list, 2, 3, unit_size, 4, device)
    full = torch.tensor([[True, False], [False, False]], device=device)
    clean_k, clean_v = k.clone(), v.clone()
    for b, n in enumerate(lens_list):  # the rest of each sequence's last block (its own)
        for t in range(n, triton.cdiv(n, page) * page):
            block = tables[b, t // page].long()
            k[block, :, t % page] = v[block, :, t % page] = float("nan")
            clean_k[block, :, t % page] = clean_v[block, :, t % page] = 0
    for args in [(), (lists, counts, full)]:
        got, _ = run_both(q, k, v, lens, unit_size, *args, sorted_lists=bool(args), block_tables=tables)
        _, want = run_both(q, clean_k, clean_v, lens, unit_size, *args, block_tables=tables)
        check(got, want, torch.bfloat16)


def test_auto_backend_on_cpu_is_the_reference():
    q, k, v, lens, _ = make_inputs("cpu", torch.float32, 2, 2, 2, 64, 128, [100, 3], seed=1)
    out, lse = sparse_decode_attention(q, k, v, lens, 0.125, 64)
    ref_out, ref_lse = sparse_decode_attention_ref(q, k, v, lens, 0.125, 64)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the CPU cases ran in this process")
def test_cpu_cases_in_a_fresh_process():
    run_in_fresh_process(__file__)


def test_dependent_launch_is_on_for_hopper_off_when_asked_and_never_in_the_interpreter(monkeypatch):
    from sparsedecode.kernels.pdl import pdl_launch

    monkeypatch.delenv("SPARSEDECODE_PDL", raising=False)
    assert pdl_launch(torch.device("cpu")) == {"PDL": False}  # the interpreter has no grid dependency control
    if torch.cuda.is_available():
        hopper = torch.cuda.get_device_capability()[0] >= 9
        assert pdl_launch(torch.device("cuda", 0)) == ({"PDL": True, "launch_pdl": True} if hopper else {"PDL": False})
        monkeypatch.setenv("SPARSEDECODE_PDL", "0")
        assert pdl_launch(torch.device("cuda", 0)) == {"PDL": False}
