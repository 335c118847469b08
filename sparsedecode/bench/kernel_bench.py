"""GPU benchmark of one decode-attention layer: PyTorch SDPA vs our kernel dense and hybrid (Lychee).

Llama-3.1-8B layer shapes (32 query heads, 8 KV heads, d=128, bf16) at 32K and 128K tokens, batch 1
and 8. Every call is captured in a CUDA graph (as in the engine's decode loop, so Python launch costs
are not measured) and timed with triton.testing.do_bench (median), rotating over several random
caches so the inputs exceed L2. The floor is the KV bytes actually read over the measured
device-copy bandwidth.

    python -m sparsedecode.bench.kernel_bench
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing

from ..kernels import sparse_decode_attention, sparse_decode_attention_ref
from ..kernels.sparse_decode import ITEMS_PER_SM

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
UNIT, BUDGET_UNITS = 64, 64  # list rows: 64 units of 64 tokens = 4096 tokens
L2_BYTES = 50 * 2**20  # H100 / H200


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


def make_cache(batch: int, context: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    shape = (batch, NUM_KV_HEADS, context, HEAD_DIM)
    units = context // UNIT
    lists = torch.rand(batch, NUM_KV_HEADS, units, device="cuda", generator=gen).argsort(-1)[..., :BUDGET_UNITS]
    full = torch.zeros(batch, NUM_KV_HEADS, dtype=torch.bool, device="cuda")
    full[:, 0] = True  # 32 retrieval KV heads of 256: one full row in eight
    return dict(
        q=torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen),
        k=torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen),
        v=torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen),
        lens=torch.full((batch,), context, dtype=torch.int32, device="cuda"),
        lists=lists.to(torch.int32).contiguous(),
        counts=torch.full((batch, NUM_KV_HEADS), BUDGET_UNITS, dtype=torch.int32, device="cuda"),
        full=full,
        unit_lse=torch.empty(batch, NUM_HEADS, units, device="cuda"),
    )


def check(c: dict[str, torch.Tensor], scale: float) -> None:
    """Kernel vs reference for sequence 0 of the config (the reference on all of 128K x 8 is slow)."""
    one = {n: t[:1] for n, t in c.items()}
    for args in [(), (UNIT, c["lists"], c["counts"], c["full"], c["unit_lse"])]:
        out, lse = sparse_decode_attention(c["q"], c["k"], c["v"], c["lens"], scale, *args)
        ref_args = (UNIT, one["lists"], one["counts"], one["full"], torch.empty_like(one["unit_lse"])) if args else ()
        ref_out, ref_lse = sparse_decode_attention_ref(one["q"], one["k"], one["v"], one["lens"], scale, *ref_args)
        torch.testing.assert_close(out[:1].float(), ref_out.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse[:1], ref_lse, atol=2e-3, rtol=2e-3)
        if args:
            got, want = c["unit_lse"][:1], ref_args[-1]
            assert torch.equal(torch.isfinite(got), torch.isfinite(want))
            finite = torch.isfinite(want)
            torch.testing.assert_close(got[finite], want[finite], atol=2e-3, rtol=2e-3)


def bench_config(context: int, batch: int, bandwidth: float) -> list[Row]:
    gen = torch.Generator(device="cuda").manual_seed(context + batch)
    cache_bytes = 2 * batch * NUM_KV_HEADS * context * HEAD_DIM * 2
    caches = [make_cache(batch, context, gen) for _ in range(max(2, -(-4 * L2_BYTES // cache_bytes)))]
    scale = HEAD_DIM**-0.5
    check(caches[0], scale)

    def sdpa(c):
        q = c["q"][:, :, None, :]
        return F.scaled_dot_product_attention(q, c["k"][:, :, :context], c["v"][:, :, :context], scale=scale,
                                              enable_gqa=True)

    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def dense(c, per_sm=ITEMS_PER_SM):
        return sparse_decode_attention(c["q"], c["k"], c["v"], c["lens"], scale, work_items=per_sm * sms)

    full_rows = batch  # one full KV head per sequence
    hybrid_tokens = full_rows * context + (batch * NUM_KV_HEADS - full_rows) * min(context, BUDGET_UNITS * UNIT)

    def hybrid(c, with_lse=False, per_sm=ITEMS_PER_SM):
        return sparse_decode_attention(c["q"], c["k"], c["v"], c["lens"], scale, UNIT, c["lists"], c["counts"],
                                       c["full"], c["unit_lse"] if with_lse else None, work_items=per_sm * sms)

    hybrid_bytes = HEAD_DIM * 2 * 2 * hybrid_tokens  # K and V of one token of one head
    methods = [
        ("sdpa dense", sdpa, cache_bytes),
        ("ours dense", dense, cache_bytes),
        ("ours hybrid", hybrid, hybrid_bytes),
        ("ours hybrid + unit_lse", lambda c: hybrid(c, True), hybrid_bytes),
    ]
    # The work-item count the chunk size aims for (the default is ITEMS_PER_SM per SM), compared.
    for per_sm in (1, 4, 8):
        methods += [(f"ours dense, {per_sm} items/SM", lambda c, n=per_sm: dense(c, n), cache_bytes),
                    (f"ours hybrid + unit_lse, {per_sm} items/SM", lambda c, n=per_sm: hybrid(c, True, n), hybrid_bytes)]
    rows = []
    for name, fn, nbytes in methods:
        us = timed([lambda c=c: fn(c) for c in caches])
        rows.append(Row(name, context, batch, us, nbytes, 1e6 * nbytes / bandwidth))
    if batch == 1:
        profile(lambda: hybrid(caches[0], True), f"hybrid + unit_lse, {context // 1024}K, batch 1")
    del caches
    torch.cuda.empty_cache()
    return rows


def profile(call: Callable[[], object], title: str, steps: int = 20) -> None:
    """Device time per kernel of `call` (eager, `steps` calls): where a layer's microseconds go."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            call()
        torch.cuda.synchronize()
    print(f"\nprofile of {title}, per call:")
    for event in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if event.device_time_total > 0:
            print(f"  {event.key[:60]:60s} {event.device_time_total / steps:8.1f} us")


def run(contexts: tuple[int, ...] = (32768, 131072), batches: tuple[int, ...] = (1, 8)) -> list[Row]:
    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    rows = []
    for context, batch in itertools.product(contexts, batches):
        print(f"context {context} batch {batch}")
        rows += bench_config(context, batch, bandwidth)
    print("\n| method | context | batch | median us | GB/s | floor us | time/floor | speedup vs SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        config = (row.context, row.batch)
        base = next(r.us for r in rows if r.method == "sdpa dense" and (r.context, r.batch) == config)
        print(f"| {row.method} | {row.context // 1024}K | {row.batch} | {row.us:.1f} | {row.kv_bytes / row.us / 1e3:.0f} "
              f"| {row.floor_us:.1f} | {row.us / row.floor_us:.2f} | {base / row.us:.2f} |")
    return rows


if __name__ == "__main__":
    run()
