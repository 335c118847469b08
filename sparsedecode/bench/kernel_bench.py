"""GPU benchmark of one decode-attention layer: PyTorch SDPA and FlashInfer vs our kernel dense and hybrid (Lychee).

Llama-3.1-8B layer shapes (32 query heads, 8 KV heads, d=128, bf16) at 32K and 128K tokens, batch 1
and 8, over a paged pool of 64-token blocks with shuffled block tables, as the engine holds its cache
(SDPA reads a gathered static copy). Every call is captured in a CUDA graph (as in the engine's decode
loop, so Python launch costs are not measured) and timed with triton.testing.do_bench (median),
rotating over several random caches so the inputs exceed L2. The floor is the KV bytes actually read
over the measured device-copy bandwidth.

With FlashInfer importable (`--flashinfer`, the default when it is), the same run times its paged
decode (`BatchDecodeWithPagedKVCacheWrapper`, tensor cores, HND on our very pool and NHD on a copy)
and, on the hybrid layer's selection, its paged decode fed only the selected pages (one request per
sequence and KV head) and its `BlockSparseAttentionWrapper` over the same blocks: the same-selection
comparison. Each FlashInfer output is checked against ours before it is timed.

The block selection (`kernels.select_blocks`) has its own table (`--select`): Quest's top-k over
16-token pages and Lychee's over 64-token blocks at the same contexts and batches, at several warp
counts. So has the prefill (`--prefill`): a prompt chunk's attention over its paged prefix, our kernel
(`kernels.paged_prefill_attention`, several launch settings) against PyTorch's attention over the
gathered prefix, its KV heads expanded (the engine's path before the kernel) or grouped (`enable_gqa`).
And so have the step's linear layers (`--gemv`): cuBLAS against `kernels.gemv` at 1 and 8 rows.

    sparsedecode bench kernel           # the table
    sparsedecode bench kernel --select  # the selection's table
    sparsedecode bench kernel --prefill # the prefill's table
    sparsedecode bench kernel --tune    # search the kernels' launch settings (`Launch`)
    sparsedecode bench kernel --gemv    # the step's linear layers: cuBLAS against kernels.gemv
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields, replace
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from ..kernels import (gather_blocks, gemv, paged_prefill_attention, select_blocks, sparse_decode_attention,
                       sparse_decode_attention_ref)
from ..kernels.gemv import GemvLaunch, gemv_launch
from ..kernels.prefill_attention import PREFILL_LAUNCH, PrefillLaunch
from ..kernels.sparse_decode import LAUNCH, Launch
from .common import kernel_times

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
GROUP = NUM_HEADS // NUM_KV_HEADS
PAGE = 64  # the engine's block size
UNIT, BUDGET_UNITS = 64, 64  # list rows: 64 units of 64 tokens = 4096 tokens
L2_BYTES = 50 * 2**20  # H100 / H200
SCALE = HEAD_DIM**-0.5
FLASHINFER_WORKSPACE_BYTES = 128 * 2**20

Case = dict[str, torch.Tensor]


@dataclass
class Row:
    method: str
    context: int
    batch: int
    us: float
    kv_bytes: float
    floor_us: float


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device clone."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    ms = triton.testing.do_bench(lambda: x.clone(), return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def timed(calls: list[Callable[[], object]]) -> float:
    """Median microseconds of a call, each replay using the next cache, each call a CUDA graph."""
    graphs = []
    for call in calls:
        call()  # compiles, allocates scratch outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        graphs.append(graph)
    cycle = itertools.cycle(graphs)
    return 1e3 * triton.testing.do_bench(lambda: next(cycle).replay(), return_mode="median")


def make_cache(batch: int, context: int, gen: torch.Generator) -> Case:
    """A paged layer: pools [B * n, Hkv, 64, D] behind shuffled block tables [B, n], full rows (one KV
    head in eight) and sorted lists of BUDGET_UNITS units (as the selection writes them)."""
    pages = context // PAGE
    shape = (batch * pages, NUM_KV_HEADS, PAGE, HEAD_DIM)
    units = context // UNIT
    lists = torch.rand(batch, NUM_KV_HEADS, units, device="cuda", generator=gen).argsort(-1)[..., :BUDGET_UNITS]
    full = torch.zeros(batch, NUM_KV_HEADS, dtype=torch.bool, device="cuda")
    full[:, 0] = True  # 32 retrieval KV heads of 256: one full row in eight
    order = torch.randperm(batch * pages, device="cuda", generator=gen)
    return dict(
        q=torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen),
        k=torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen),
        v=torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen),
        tables=order.view(batch, pages).to(torch.int32),
        lens=torch.full((batch,), context, dtype=torch.int32, device="cuda"),
        lists=lists.sort(-1).values.to(torch.int32).contiguous(),
        counts=torch.full((batch, NUM_KV_HEADS), BUDGET_UNITS, dtype=torch.int32, device="cuda"),
        full=full,
        unit_lse=torch.empty(batch, NUM_HEADS, units, device="cuda"),
    )


def dense(c: Case, launch: Launch = LAUNCH) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_decode_attention(c["q"], c["k"], c["v"], c["lens"], SCALE, launch=launch, block_tables=c["tables"])


def hybrid(c: Case, with_lse: bool = True, launch: Launch = LAUNCH) -> tuple[torch.Tensor, torch.Tensor]:
    """One full row (retrieval KV head) per sequence, the others 64 listed units: Lychee's layer, called
    as the engine calls it (sorted lists; block scores of the retrieval rows only)."""
    return sparse_decode_attention(c["q"], c["k"], c["v"], c["lens"], SCALE, UNIT, c["lists"], c["counts"],
                                   c["full"], c["unit_lse"] if with_lse else None, launch=launch, sorted_lists=True,
                                   block_tables=c["tables"], scored_rows=c["full"])


def check(c: Case, launch: Launch = LAUNCH) -> None:
    """Dense and hybrid vs the reference for sequence 0 of the config (the reference on all of 128K x 8
    is slow)."""
    one = {n: t[:1] for n, t in c.items() if n not in ("k", "v")}
    out, lse = dense(c, launch)
    ref_out, ref = sparse_decode_attention_ref(one["q"], c["k"], c["v"], one["lens"], SCALE,
                                               block_tables=one["tables"])
    torch.testing.assert_close(out[:1].float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse[:1], ref, atol=2e-3, rtol=2e-3)
    out, lse = hybrid(c, launch=launch)
    ref_lse = torch.empty_like(one["unit_lse"])
    ref_out, ref = sparse_decode_attention_ref(one["q"], c["k"], c["v"], one["lens"], SCALE, UNIT, one["lists"],
                                               one["counts"], one["full"], ref_lse, block_tables=one["tables"],
                                               scored_rows=one["full"])
    torch.testing.assert_close(out[:1].float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse[:1], ref, atol=2e-3, rtol=2e-3)
    got = c["unit_lse"][:1]
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(got[finite], ref_lse[finite], atol=2e-3, rtol=2e-3)


def make_caches(context: int, batch: int) -> list[Case]:
    """Enough random caches that rotating over them exceeds L2, the first checked against the reference."""
    gen = torch.Generator(device="cuda").manual_seed(context + batch)
    cache_bytes = 2 * batch * NUM_KV_HEADS * context * HEAD_DIM * 2
    caches = [make_cache(batch, context, gen) for _ in range(max(2, -(-4 * L2_BYTES // cache_bytes)))]
    check(caches[0])
    return caches


def kv_bytes(context: int, batch: int, method: str) -> int:
    """K and V bytes the call reads: every token of every head (dense), or one full head per sequence
    and the listed units of the others (hybrid)."""
    per_token = HEAD_DIM * 2 * 2
    if method == "dense":
        return per_token * batch * NUM_KV_HEADS * context
    return per_token * (batch * context + batch * (NUM_KV_HEADS - 1) * min(context, BUDGET_UNITS * UNIT))


# ----------------------------------------------------------------------------------------- FlashInfer

def import_flashinfer() -> tuple[ModuleType | None, str]:
    """flashinfer, or None and why it cannot be imported."""
    try:
        import flashinfer
    except Exception as e:  # not installed, or its import fails on this machine (versions, CUDA)
        return None, f"{type(e).__name__}: {e}"
    return flashinfer, getattr(flashinfer, "__version__", "?")


def selected_pages(c: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The hybrid layer's selection as one request per (sequence, KV head) over the pool seen as pages of
    one KV head ([NB * Hkv, 1, 64, D], page id = block * Hkv + head): CSR indptr and page ids, int32."""
    pages, lengths = [], []
    for b in range(c["q"].shape[0]):
        table = c["tables"][b].long()
        for h in range(NUM_KV_HEADS):
            units = (torch.arange(table.numel(), device=table.device) if c["full"][b, h]
                     else c["lists"][b, h, : c["counts"][b, h]].long())
            pages.append(table[units] * NUM_KV_HEADS + h)
            lengths.append(units.numel())
    indptr = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    return indptr, torch.cat(pages).to(torch.int32)


def flashinfer_calls(fi: ModuleType, workspace: torch.Tensor, c: Case) -> dict[str, Callable[[], Callable]]:
    """FlashInfer's calls on cache `c`, by row name: each entry plans when called and returns the call, which
    returns out [B, Hq, D]."""
    batch, pages = c["tables"].shape
    plan_args = dict(q_data_type=DTYPE, kv_data_type=DTYPE, sm_scale=SCALE)

    def paged_decode(layout, k, v, indptr, indices, kv_heads):
        wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, layout, use_tensor_cores=True)
        requests = indptr.numel() - 1
        last = torch.full((requests,), PAGE, dtype=torch.int32, device="cuda")  # contexts are whole pages
        wrapper.plan(indptr, indices, last, GROUP * kv_heads, kv_heads, HEAD_DIM, PAGE, **plan_args)
        q = c["q"].view(requests, GROUP * kv_heads, HEAD_DIM)
        out = torch.empty_like(q)
        return lambda: wrapper.run(q, (k, v), out=out).view(batch, NUM_HEADS, HEAD_DIM)

    def dense_pages(layout):
        indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * pages
        k, v = (c["k"], c["v"]) if layout == "HND" else (c["k"].transpose(1, 2).contiguous(),
                                                          c["v"].transpose(1, 2).contiguous())
        return paged_decode(layout, k, v, indptr, c["tables"].flatten(), NUM_KV_HEADS)

    def selected_paged_decode():
        one_head = (-1, 1, PAGE, HEAD_DIM)
        return paged_decode("HND", c["k"].view(one_head), c["v"].view(one_head), *selected_pages(c), 1)

    def block_sparse():
        bsr = fi.BlockSparseAttentionWrapper(workspace, backend="fa2")
        rows, tokens = batch * NUM_KV_HEADS, c["k"].numel() // HEAD_DIM
        bsr.plan(*selected_pages(c), rows, tokens, 1, PAGE, GROUP, 1, HEAD_DIM, o_data_type=DTYPE, **plan_args)
        q = c["q"].view(rows, GROUP, HEAD_DIM)
        k, v = c["k"].view(tokens, 1, HEAD_DIM), c["v"].view(tokens, 1, HEAD_DIM)
        out = torch.empty_like(q)
        return lambda: bsr.run(q, k, v, out=out).view(batch, NUM_HEADS, HEAD_DIM)

    return {
        "flashinfer dense (HND, our pool)": lambda: dense_pages("HND"),
        "flashinfer dense (NHD copy)": lambda: dense_pages("NHD"),
        "flashinfer sparse (selected pages)": selected_paged_decode,
        "flashinfer block-sparse (BSR, fa2)": block_sparse,
    }


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def flashinfer_rows(fi: ModuleType, caches: list[Case]) -> list[tuple[str, list[Callable[[], object]], str]]:
    """(row name, one call per cache, dense or hybrid) of every FlashInfer call that plans, runs and
    matches our output on the first cache; the others are skipped with a note."""
    workspace = torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    want = {"dense": dense(caches[0])[0], "hybrid": hybrid(caches[0], with_lse=False)[0]}
    builders = [flashinfer_calls(fi, workspace, c) for c in caches]
    rows = []
    for name in builders[0]:
        kind = "dense" if "dense" in name else "hybrid"
        try:  # an API this FlashInfer version lacks, a failed JIT build, a layout it refuses
            calls = [per_cache[name]() for per_cache in builders]
            error = relative_error(calls[0](), want[kind])
        except Exception as e:
            print(f"  {name} skipped: {type(e).__name__}: {e}")
            continue
        if error > 2e-2:
            print(f"  {name} skipped: its output differs from ours by {error:.3f} (relative L2)")
            continue
        rows.append((name, calls, kind))
    return rows


# ---------------------------------------------------------------------------------------------- table

def launch_name(launch: Launch) -> str:
    """The fields of `launch` that differ from the default, as 'a=1, b=2' ('' for the default)."""
    return ", ".join(f"{f.name}={getattr(launch, f.name)}" for f in fields(Launch)
                     if getattr(launch, f.name) != getattr(LAUNCH, f.name))


def bench_config(context: int, batch: int, bandwidth: float, fi: ModuleType | None,
                 launches: tuple[Launch, ...] = ()) -> list[Row]:
    caches = make_caches(context, batch)
    methods: list[tuple[str, list[Callable[[], object]], str]] = [
        ("ours dense", [lambda c=c: dense(c) for c in caches], "dense"),
        ("ours hybrid", [lambda c=c: hybrid(c, with_lse=False) for c in caches], "hybrid"),
        ("ours hybrid + unit_lse", [lambda c=c: hybrid(c) for c in caches], "hybrid"),
    ]
    for launch in launches:
        check(caches[0], launch)
        name = launch_name(launch)
        methods += [(f"ours dense [{name}]", [lambda c=c, l=launch: dense(c, l) for c in caches], "dense"),
                    (f"ours hybrid + unit_lse [{name}]", [lambda c=c, l=launch: hybrid(c, launch=l) for c in caches],
                     "hybrid")]
    rows = [Row("sdpa dense", context, batch, time_sdpa(caches), kv_bytes(context, batch, "dense"), 0.0)]
    for name, calls, kind in methods:
        rows.append(Row(name, context, batch, timed(calls), kv_bytes(context, batch, kind), 0.0))
    for name, calls, kind in flashinfer_rows(fi, caches) if fi is not None else []:
        try:
            us = timed(calls)
        except Exception as e:  # e.g. a call that cannot be captured in a CUDA graph
            print(f"  {name} skipped: {type(e).__name__}: {e}")
            continue
        rows.append(Row(name, context, batch, us, kv_bytes(context, batch, kind), 0.0))
    for row in rows:
        row.floor_us = 1e6 * row.kv_bytes / bandwidth
    if batch == 1:
        first = caches[0]
        profile(lambda: hybrid(first), f"hybrid + unit_lse, {context // 1024}K, batch 1")
    caches.clear()
    torch.cuda.empty_cache()
    return rows


def time_sdpa(caches: list[Case]) -> float:
    """PyTorch SDPA (GQA) over static copies [B, Hkv, T, D] of the caches, freed afterwards."""
    static = [(c["q"][:, :, None, :], gather_blocks(c["k"], c["tables"]), gather_blocks(c["v"], c["tables"]))
              for c in caches]
    us = timed([lambda s=s: F.scaled_dot_product_attention(*s, scale=SCALE, enable_gqa=True) for s in static])
    static.clear()
    torch.cuda.empty_cache()
    return us


def profile(call: Callable[[], object], title: str) -> None:
    """Device time per kernel of `call` (eager): where a layer's microseconds go."""
    print(f"\nprofile of {title}, per call:")
    for name, seconds in kernel_times(call, steps=20):
        print(f"  {name[:60]:60s} {seconds * 1e6:8.1f} us")


def run(contexts: tuple[int, ...] = (32768, 131072), batches: tuple[int, ...] = (1, 8),
        flashinfer: bool | None = None, launches: tuple[Launch, ...] = ()) -> list[Row]:
    """The table; flashinfer: True needs it importable, None adds its rows when it is; `launches` adds
    rows of our kernels under those settings."""
    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    fi = None
    if flashinfer is not False:
        fi, about = import_flashinfer()
        if fi is None and flashinfer:
            raise RuntimeError(f"--flashinfer: flashinfer cannot be imported ({about})")
        print(f"flashinfer {about}" if fi is not None else f"flashinfer rows skipped: not importable ({about})")
    rows = []
    for context, batch in itertools.product(contexts, batches):
        print(f"context {context} batch {batch}", flush=True)
        rows += bench_config(context, batch, bandwidth, fi, launches)
    print("\n| method | context | batch | median us | GB/s | floor us | time/floor | speedup vs SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = same_config(rows, row, "sdpa dense")
        print(f"| {row.method} | {row.context // 1024}K | {row.batch} | {row.us:.1f} | {row.kv_bytes / row.us / 1e3:.0f} "
              f"| {row.floor_us:.1f} | {row.us / row.floor_us:.2f} | {base.us / row.us:.2f} |")
    if fi is not None:
        print_against_flashinfer(rows)
    return rows


def same_config(rows: list[Row], row: Row, method: str) -> Row | None:
    return next((r for r in rows if r.method == method and (r.context, r.batch) == (row.context, row.batch)), None)


def print_against_flashinfer(rows: list[Row]) -> None:
    """Our time over FlashInfer's on the same work: dense against its faster layout, the hybrid layer
    (without block scores, as FlashInfer computes none) against each same-selection call."""
    print("\n| ours | flashinfer | context | batch | ours us | flashinfer us | ours / flashinfer |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if not row.method.startswith("flashinfer"):
            continue
        ours = same_config(rows, row, "ours dense" if "dense" in row.method else "ours hybrid")
        print(f"| {ours.method} | {row.method} | {row.context // 1024}K | {row.batch} | {ours.us:.1f} | {row.us:.1f} "
              f"| {ours.us / row.us:.3f} |")


#: (name, tokens per block, kept tokens, sink blocks, with lse: scores from unit_lse [B, Hq, NB], rows:
#: "all" or "retrieval" (one KV head per sequence, as Lychee's selecting layers))
SELECT_CASES = (("quest", 16, 4096, 0, False, "all"), ("lychee", 64, 4096, 1, True, "retrieval"),
                ("lfps", 64, 4096, 1, True, "all"))
SELECT_WARPS = (4, 8, 16)


def select_rows(contexts: tuple[int, ...], batches: tuple[int, ...]) -> None:
    """Time `select_blocks` alone (CUDA graph, median) on random scores for every case, context and batch,
    with SELECT_WARPS warps; the default is marked."""
    from ..kernels.select_blocks import launch_warps

    print(f"device: {torch.cuda.get_device_name()}")
    print("\n| select | context | batch | blocks | kept | warps | us |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for (name, block, kept, sink, with_lse, rows), context, batch in itertools.product(SELECT_CASES, contexts,
                                                                                         batches):
        num_blocks = context // block
        heads = NUM_HEADS if with_lse else NUM_KV_HEADS
        scores = torch.randn(batch, heads, num_blocks, device="cuda", generator=gen) * 3
        lse = torch.logsumexp(scores, -1) if with_lse else None
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        mask = torch.ones(batch, NUM_KV_HEADS, dtype=torch.bool, device="cuda")
        if rows == "retrieval":
            mask[:, 1:] = False
        blocks = torch.zeros(batch, NUM_KV_HEADS, kept // block + 2, dtype=torch.int32, device="cuda")
        counts = torch.zeros(batch, NUM_KV_HEADS, dtype=torch.int32, device="cuda")
        default = launch_warps(max(16, triton.next_power_of_2(num_blocks)))
        for warps in SELECT_WARPS:
            us = timed([lambda: select_blocks(scores, lse, lens, mask, blocks, counts, aggregate="sum", mode="tokens",
                                              budget=kept, block_size=block, sink_blocks=sink, local_blocks=1,
                                              num_warps=warps)])
            mark = " (default)" if warps == default else ""
            print(f"| {name} | {context // 1024}K | {batch} | {num_blocks} | {kept // block} | {warps}{mark} "
                  f"| {us:.1f} |", flush=True)


#: (chunk tokens, keys after the chunk) of `prefill_rows`: a whole first chunk, chunks behind 32K and 128K
PREFILL_CASES = ((2048, 2048), (8192, 8192), (1024, 32768), (2048, 32768), (1024, 131072))
PREFILL_LAUNCHES = tuple(PrefillLaunch(block_m=m, num_warps=w, num_stages=st)
                         for m, w, st in itertools.product((64, 128, 256), (4, 8), (2, 3)))


def median_us(call: Callable[[], object]) -> float:
    return 1e3 * triton.testing.do_bench(call, return_mode="median")


def prefill_rows(cases: tuple[tuple[int, int], ...] = PREFILL_CASES,
                 launches: tuple[PrefillLaunch, ...] = PREFILL_LAUNCHES, device: str = "cuda",
                 time_us: Callable[[Callable[[], object]], float] = median_us) -> None:
    """Time a prompt chunk's attention over its sequence's paged keys (one request, Llama-3.1-8B heads):
    PyTorch SDPA over the gathered prefix with the KV heads expanded (what the engine ran before the paged
    kernel) and with `enable_gqa`, and `paged_prefill_attention` at every PREFILL_LAUNCHES setting. Medians
    of do_bench (no CUDA graph: prefill steps are not captured); each output checked against the first."""
    from torch.nn.attention.bias import causal_lower_right

    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else device}")
    print("\n| chunk | keys | call | us | TFLOP/s | max abs diff |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator(device=device).manual_seed(0)
    for rows, keys in cases:
        blocks = -(-keys // PAGE)
        k_pool, v_pool = (torch.randn(blocks + 8, NUM_KV_HEADS, PAGE, HEAD_DIM, device=device, dtype=DTYPE,
                                      generator=gen) for _ in range(2))
        table = torch.randperm(blocks + 8, device=device, generator=gen)[:blocks].int()[None]
        q = torch.randn(rows, NUM_HEADS, HEAD_DIM, device=device, dtype=DTYPE, generator=gen)
        mask = causal_lower_right(rows, keys)

        def gathered(expand: bool) -> torch.Tensor:
            k, v = (gather_blocks(pool, table)[0, :, :keys] for pool in (k_pool, v_pool))
            if expand:
                k, v = k.repeat_interleave(GROUP, dim=0), v.repeat_interleave(GROUP, dim=0)
            return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                                  enable_gqa=not expand)[0].transpose(0, 1)

        calls = {"SDPA, gathered, heads expanded": lambda: gathered(True),
                 "SDPA, gathered, enable_gqa": lambda: gathered(False)}
        for launch in launches:
            calls[f"paged kernel, {launch.block_m} rows, {launch.num_warps} warps, {launch.num_stages} stages"] = (
                lambda launch=launch: paged_prefill_attention(q, k_pool, v_pool, table, [0, rows], [keys], SCALE,
                                                              launch=launch, backend="triton"))
        flops = 4 * NUM_HEADS * HEAD_DIM * rows * (keys - rows / 2)
        want = None
        for name, call in calls.items():
            try:
                got = call()
                us = time_us(call)
            except (OutOfResources, RuntimeError) as e:  # an SDPA backend or a launch that does not fit
                print(f"| {rows} | {keys // 1024}K | {name} | failed: {str(e)[:80]} | | |", flush=True)
                continue
            want = got if want is None else want
            diff = (got.float() - want.float()).abs().max().item()
            mark = " (default)" if name.endswith(f"{PREFILL_LAUNCH.block_m} rows, {PREFILL_LAUNCH.num_warps} warps, "
                                                 f"{PREFILL_LAUNCH.num_stages} stages") else ""
            print(f"| {rows} | {keys // 1024}K | {name}{mark} | {us:.1f} | {flops / us / 1e6:.0f} | {diff:.3g} |",
                  flush=True)


#: the values `tune` tries for each `Launch` field
TUNE_GRID: dict[str, tuple[int, ...]] = {
    "num_stages": (2, 3, 4, 5),
    "num_warps": (4, 8),
    "tile_elements": (4096, 8192, 16384),
    "items_per_sm": (1, 2, 3, 4, 6, 8),
    "merge_elements": (4096, 8192, 16384),
    "min_chunk_tokens": (64, 128, 256, 512),
}
#: the calls `tune` scores a setting on: (method, context, batch)
TUNE_CASES = (("hybrid", 131072, 1), ("hybrid", 32768, 8), ("hybrid", 131072, 8), ("dense", 131072, 1),
              ("dense", 32768, 8))


def tune(rounds: int = 1) -> Launch:
    """Coordinate descent over `TUNE_GRID` from the current default: each field in turn takes the value
    with the lowest geometric mean of the time over floor of `TUNE_CASES` (hybrid with unit_lse, as
    Lychee calls it; dense so that it does not regress). Prints every setting tried, best last."""
    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    caches = {(ctx, b): make_caches(ctx, b) for ctx, b in {(ctx, b) for _, ctx, b in TUNE_CASES}}
    scores: dict[Launch, list[float]] = {}

    def score(launch: Launch) -> float:
        if launch not in scores:
            ratios = []
            try:
                for method, ctx, b in TUNE_CASES:
                    fn = dense if method == "dense" else hybrid
                    us = timed([lambda c=c: fn(c, launch=launch) for c in caches[(ctx, b)]])
                    ratios.append(us / (1e6 * kv_bytes(ctx, b, method) / bandwidth))
            except OutOfResources as e:  # e.g. big tiles x deep pipelines: no shared memory
                print(f"{launch}: does not fit ({e})", flush=True)
                return math.inf
            scores[launch] = ratios
            print(f"{launch}: time/floor {' '.join(f'{r:.2f}' for r in ratios)}, "
                  f"geomean {math.prod(ratios) ** (1 / len(ratios)):.3f}", flush=True)
        return math.prod(scores[launch])

    best = LAUNCH
    for _ in range(rounds):
        before = best
        for field, values in TUNE_GRID.items():
            best = min((replace(best, **{field: value}) for value in values), key=score)
        if best == before:
            break
    print("\n| setting | " + " | ".join(f"{m} {ctx // 1024}K B{b}" for m, ctx, b in TUNE_CASES) + " | geomean |")
    print("|---|" + "---|" * (len(TUNE_CASES) + 1))
    for launch, ratios in sorted(scores.items(), key=lambda item: -math.prod(item[1])):
        print(f"| {launch_name(launch) or 'default'} | " + " | ".join(f"{r:.2f}" for r in ratios)
              + f" | {math.prod(ratios) ** (1 / len(ratios)):.3f} |")
    print(f"\nbest: {best}")
    return best


#: Llama-3.1-8B's decode-step linear layers: name, (N, K) of the weight, how many a step runs
GEMV_SHAPES = (("qkv_proj", (6144, 4096), 32), ("o_proj", (4096, 4096), 32), ("gate_up_proj", (28672, 4096), 32),
               ("down_proj", (4096, 14336), 32), ("lm_head", (128256, 4096), 1))
GEMV_LAUNCHES = tuple(GemvLaunch(block_n=n, block_k=k, num_warps=w, num_stages=st)
                      for n, k, w, st in itertools.product((16, 32, 64), (256, 512), (4, 8), (3, 4)))
GEMV_CHAIN = 32  # calls per captured graph, one per layer as a step runs them


def chained_us(call: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> float:
    """Median microseconds per call of GEMV_CHAIN calls captured in one CUDA graph, cycling over `weights`
    (each call's weight out of L2): launch costs are spread as in a step, and dependent launches overlap."""
    call(weights[0])  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(GEMV_CHAIN):
            call(weights[i % len(weights)])
    return 1e3 * triton.testing.do_bench(graph.replay, return_mode="median") / GEMV_CHAIN


def gemv_rows(rows: tuple[int, ...] = (1, 8), launches: tuple[GemvLaunch, ...] = GEMV_LAUNCHES,
              bandwidth: float | None = None) -> None:
    """Time the decode step's linear layers (Llama-3.1-8B shapes, bf16): cuBLAS (`F.linear`) against `gemv` at
    every launch setting (`chained_us`). Prints, per shape and row count, cuBLAS, `gemv` at the engine's
    launch (`gemv_launch`) and at its fastest one (us per call and weight TB/s; each output checked against
    cuBLAS), then the step's total over all its layers for each."""
    bandwidth = bandwidth or copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write); "
          f"{GEMV_CHAIN} calls per CUDA graph")
    print("\n| layer | rows | cuBLAS us | TB/s | gemv engine's launch us | TB/s | gemv fastest us | TB/s | fastest launch |")
    print("|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    totals: dict[tuple[int, str], float] = {}
    for name, (n, k), count in GEMV_SHAPES:
        copies = max(2, math.ceil(4 * L2_BYTES / (2 * n * k)))
        weights = [torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen) / k**0.5 for _ in range(copies)]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=DTYPE, generator=gen)
            want = F.linear(x, weights[0]).float()
            times = {"cuBLAS": chained_us(lambda w: F.linear(x, w), weights)}
            for launch in launches:
                try:
                    got = gemv(x, weights[0], launch=launch).float()
                    times[launch] = chained_us(lambda w, launch=launch: gemv(x, w, launch=launch), weights)
                except OutOfResources:  # tiles that do not fit in shared memory
                    continue
                if (got - want).abs().max().item() > 1e-2 * want.abs().max().item():
                    raise AssertionError(f"gemv {launch} differs from F.linear on {name} with {m} rows")
            fastest = min((t for t in times if t != "cuBLAS"), key=times.get)
            tbs = {t: 2 * n * k / (us * 1e6) for t, us in times.items()}
            default = gemv_launch(n, k)  # the engine's
            print(f"| {name} | {m} | {times['cuBLAS']:.1f} | {tbs['cuBLAS']:.2f} | {times[default]:.1f} | "
                  f"{tbs[default]:.2f} | {times[fastest]:.1f} | {tbs[fastest]:.2f} | {fastest} |", flush=True)
            for label, key in (("cuBLAS", "cuBLAS"), ("gemv, engine's launch", default),
                               ("gemv, fastest launch per layer", fastest)):
                totals[m, label] = totals.get((m, label), 0.0) + count * times[key]
        del weights
    print("\n| rows | step's linear layers | us | x cuBLAS |\n|---|---|---|---|")
    for (m, label), us in totals.items():
        print(f"| {m} | {label} | {us:.0f} | {totals[m, 'cuBLAS'] / us:.3f} |")


if __name__ == "__main__":
    run()
