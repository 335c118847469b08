"""The paged prefill attention kernel against its PyTorch reference, and the reference against PyTorch's own
causal attention over the gathered, expanded prefix (what the engine ran before).

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (see triton_cpu); with CUDA the same
cases also run compiled on the GPU.
"""
import importlib
import math

import torch

from triton_cpu import devices, fix_interpreter, interpreted, run_in_fresh_process  # sets TRITON_INTERPRET

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from sparsedecode.kernels import paged_prefill_attention, paged_prefill_attention_ref  # noqa: E402
from sparsedecode.kernels.prefill_attention import (PREFILL_LAUNCH, SMALL_PREFILL_LAUNCH, PrefillLaunch,  # noqa: E402
                                                    default_launch, shared_memory_bytes)

INTERPRET = interpreted(importlib.import_module("sparsedecode.kernels.prefill_attention")._prefill_kernel)
NEEDS_FRESH_PROCESS = not INTERPRET and not torch.cuda.is_available()
if INTERPRET:
    fix_interpreter()  # two bugs of triton 3.6's interpreter (see triton_cpu)
DEVICES = devices(INTERPRET)
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_case(seed, device, dtype, kv_heads, group, dim, page, chunks):
    """Pools with NaN wherever no key of a request is (free blocks, slots past a sequence's end), shuffled
    block tables, and queries for `chunks` = [(queries, keys)] per request."""
    gen = torch.Generator().manual_seed(seed)
    blocks_each = [math.ceil(keys / page) for _, keys in chunks]
    width = max(blocks_each) + 1
    num_blocks = sum(blocks_each) + 3
    k_pool = torch.full((num_blocks, kv_heads, page, dim), float("nan"))
    v_pool = torch.full_like(k_pool, float("nan"))
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(chunks), width, dtype=torch.int32)
    used = 0
    for r, ((_, keys), count) in enumerate(zip(chunks, blocks_each)):
        ids = order[used:used + count]
        used += count
        tables[r, :count] = ids.int()
        for i, block in enumerate(ids.tolist()):
            filled = min(page, keys - i * page)
            k_pool[block, :, :filled] = torch.randn(kv_heads, filled, dim, generator=gen)
            v_pool[block, :, :filled] = torch.randn(kv_heads, filled, dim, generator=gen)
    starts = [0]
    for rows, _ in chunks:
        starts.append(starts[-1] + rows)
    q = torch.randn(starts[-1], kv_heads * group, dim, generator=gen)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k_pool.to(**to), v_pool.to(**to), tables.to(device), starts, [keys for _, keys in chunks]


CASES = [  # kv heads, group, head dim, block size, [(queries, keys)] per request, rows per program
    (1, 1, 16, 16, [(5, 5)], 16),  # one whole prompt, shorter than a tile
    (2, 4, 32, 16, [(20, 50), (7, 7), (33, 33)], 16),  # a chunk behind a prefix, whole prompts, several tiles
    (2, 2, 64, 32, [(1, 97), (40, 40)], 16),  # a single query behind 96 keys
    (1, 3, 16, 16, [(17, 64), (16, 16)], 32),  # a chunk that ends at a block boundary; group of 3
    (4, 1, 16, 64, [(70, 200)], 64),  # the prefix not a multiple of the block
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(device, dtype, case):
    kv_heads, group, dim, page, chunks, block_m = CASES[case]
    q, k_pool, v_pool, tables, starts, lens = make_case(case, device, dtype, kv_heads, group, dim, page, chunks)
    want = paged_prefill_attention_ref(q, k_pool, v_pool, tables, starts, lens, 1 / math.sqrt(dim))
    got = paged_prefill_attention(q, k_pool, v_pool, tables, starts, lens, launch=PrefillLaunch(block_m=block_m),
                                  backend="triton")
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_reference_is_causal_attention_over_the_gathered_expanded_prefix():
    """What the engine computed per request: keys gathered out of the pool, expanded to every query head,
    PyTorch's attention with the bottom-right causal mask."""
    q, k_pool, v_pool, tables, starts, lens = make_case(7, "cpu", torch.float32, 2, 3, 16, 16, [(9, 40), (12, 12)])
    got = paged_prefill_attention_ref(q, k_pool, v_pool, tables, starts, lens, 0.3)
    for r, length in enumerate(lens):
        rows = q[starts[r]:starts[r + 1]].transpose(0, 1)
        blocks = tables[r, :math.ceil(length / 16)].long()
        keys = k_pool[blocks].transpose(0, 1).flatten(1, 2)[:, :length].repeat_interleave(3, dim=0)
        values = v_pool[blocks].transpose(0, 1).flatten(1, 2)[:, :length].repeat_interleave(3, dim=0)
        want = F.scaled_dot_product_attention(rows[None], keys[None], values[None], scale=0.3,
                                              attn_mask=causal_lower_right(rows.shape[1], length))[0]
        torch.testing.assert_close(got[starts[r]:starts[r + 1]], want.transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change,message", [
    (dict(starts=[0, 4]), "query_starts must run from 0"),
    (dict(lens=[3]), "5 queries and 3 keys"),
    (dict(lens=[100]), "at most 48 in its block table"),
    (dict(starts=[0, 2, 5]), "query starts for 1 context lengths"),
])
def test_bad_input_names_the_problem(change, message):
    q, k_pool, v_pool, tables, starts, lens = make_case(1, "cpu", torch.float32, 1, 2, 16, 16, [(5, 20)])
    args = dict(starts=starts, lens=lens) | change
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(q, k_pool, v_pool, tables, args["starts"], args["lens"])


def test_a_launch_the_kernel_cannot_take_is_refused():
    q, k_pool, v_pool, tables, starts, lens = make_case(1, "cpu", torch.float32, 1, 2, 16, 16, [(5, 20)])
    with pytest.raises(ValueError, match="block_m must be a power of two of at least 16, not 24"):
        paged_prefill_attention(q, k_pool, v_pool, tables, starts, lens, launch=PrefillLaunch(block_m=24),
                                backend="triton")


# max_shared_mem per block (opt-in) that Triton reports: H100/H200, A100, and sm_86/sm_89 GPUs
H200_SMEM, A100_SMEM, ADA_SMEM = 232448, 166912, 101376


@pytest.mark.parametrize("smem, dtype, want", [
    (H200_SMEM, torch.bfloat16, PREFILL_LAUNCH), (A100_SMEM, torch.bfloat16, PREFILL_LAUNCH),
    (ADA_SMEM, torch.bfloat16, SMALL_PREFILL_LAUNCH), (H200_SMEM, torch.float32, PREFILL_LAUNCH),
    (A100_SMEM, torch.float32, SMALL_PREFILL_LAUNCH),
])
def test_default_launch_fits_the_gpus_shared_memory(smem, dtype, want):
    """Llama-shaped heads (d=128) in 64-token blocks: the tuned launch where its buffers fit, the small one
    elsewhere, and the small one fits every GPU listed."""
    size = torch.empty((), dtype=dtype).element_size()
    assert default_launch(64, 128, size, smem) == want
    assert shared_memory_bytes(default_launch(64, 128, size, smem), 64, 128, size) <= smem
    assert shared_memory_bytes(SMALL_PREFILL_LAUNCH, 64, 128, 2) <= ADA_SMEM


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_table_times_every_call_on_the_same_output(device, capsys):
    """`bench kernel --prefill` on a small case: each call's row, and the kernel's output equal to SDPA's."""
    from sparsedecode.bench import kernel_bench

    kernel_bench.prefill_rows(cases=((16, 80),), launches=(PrefillLaunch(block_m=16, num_warps=4, num_stages=2),),
                              device=device, time_us=lambda call: 1.0)
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 16 |")]
    assert [row[2] for row in rows] == ["SDPA, gathered, heads expanded", "SDPA, gathered, enable_gqa",
                                        "paged kernel, 16 rows, 4 warps, 2 stages"]
    assert all(float(row[5].rstrip(" |")) < 0.05 for row in rows)  # bf16: each output against the first


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the CPU cases ran in this process")
def test_cpu_cases_in_a_fresh_process():
    run_in_fresh_process(__file__)
