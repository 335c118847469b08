"""GPU benchmark of one decode-attention layer: PyTorch SDPA vs our kernel dense and hybrid (Lychee).

Llama-3.1-8B layer shapes (32 query heads, 8 KV heads, d=128, bf16) at 32K and 128K tokens, batch 1
and 8. Every call is captured in a CUDA graph (as in the engine's decode loop, so Python launch costs
are not measured) and timed with triton.testing.do_bench (median), rotating over several random
caches so the inputs exceed L2. The floor is the KV bytes actually read over the measured
device-copy bandwidth.

    sparsedecode bench kernel           # the table
    sparsedecode bench kernel --tune    # search the kernels' launch settings (`Launch`)
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from ..kernels import sparse_decode_attention, sparse_decode_attention_ref
from ..kernels.sparse_decode import LAUNCH, Launch
from .common import kernel_times

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


def make_caches(context: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """Enough random caches that rotating over them exceeds L2, the first checked against the reference."""
    gen = torch.Generator(device="cuda").manual_seed(context + batch)
    cache_bytes = 2 * batch * NUM_KV_HEADS * context * HEAD_DIM * 2
    caches = [make_cache(batch, context, gen) for _ in range(max(2, -(-4 * L2_BYTES // cache_bytes)))]
    check(caches[0], HEAD_DIM**-0.5)
    return caches


def dense(c: dict[str, torch.Tensor], launch: Launch = LAUNCH) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_decode_attention(c["q"], c["k"], c["v"], c["lens"], HEAD_DIM**-0.5, launch=launch)


def hybrid(c: dict[str, torch.Tensor], with_lse: bool = True, launch: Launch = LAUNCH) -> tuple[torch.Tensor, torch.Tensor]:
    """One full row (retrieval KV head) per sequence, the others 64 listed units: Lychee's layer."""
    return sparse_decode_attention(c["q"], c["k"], c["v"], c["lens"], HEAD_DIM**-0.5, UNIT, c["lists"], c["counts"],
                                   c["full"], c["unit_lse"] if with_lse else None, launch=launch)


def kv_bytes(context: int, batch: int, method: str) -> int:
    """K and V bytes the call reads: every token of every head (dense), or one full head per sequence
    and the listed units of the others (hybrid)."""
    per_token = HEAD_DIM * 2 * 2
    if method == "dense":
        return per_token * batch * NUM_KV_HEADS * context
    return per_token * (batch * context + batch * (NUM_KV_HEADS - 1) * min(context, BUDGET_UNITS * UNIT))


def bench_config(context: int, batch: int, bandwidth: float) -> list[Row]:
    caches = make_caches(context, batch)
    scale = HEAD_DIM**-0.5

    def sdpa(c):
        q = c["q"][:, :, None, :]
        return F.scaled_dot_product_attention(q, c["k"][:, :, :context], c["v"][:, :, :context], scale=scale,
                                              enable_gqa=True)

    methods = [
        ("sdpa dense", sdpa, kv_bytes(context, batch, "dense")),
        ("ours dense", dense, kv_bytes(context, batch, "dense")),
        ("ours hybrid", lambda c: hybrid(c, with_lse=False), kv_bytes(context, batch, "hybrid")),
        ("ours hybrid + unit_lse", hybrid, kv_bytes(context, batch, "hybrid")),
    ]
    rows = []
    for name, fn, nbytes in methods:
        us = timed([lambda c=c: fn(c) for c in caches])
        rows.append(Row(name, context, batch, us, nbytes, 1e6 * nbytes / bandwidth))
    if batch == 1:
        first = caches[0]
        profile(lambda: hybrid(first), f"hybrid + unit_lse, {context // 1024}K, batch 1")
    caches.clear()
    torch.cuda.empty_cache()
    return rows


def profile(call: Callable[[], object], title: str) -> None:
    """Device time per kernel of `call` (eager): where a layer's microseconds go."""
    print(f"\nprofile of {title}, per call:")
    for name, seconds in kernel_times(call, steps=20):
        print(f"  {name[:60]:60s} {seconds * 1e6:8.1f} us")


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


#: the values `tune` tries for each `Launch` field
TUNE_GRID: dict[str, tuple[int, ...]] = {
    "num_stages": (2, 3, 4, 5),
    "num_warps": (4, 8),
    "tile_elements": (4096, 8192, 16384),
    "items_per_sm": (1, 2, 3, 4),
    "merge_elements": (4096, 8192, 16384),
    "min_chunk_tokens": (128, 256, 512),
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
        fields = ", ".join(f"{f}={getattr(launch, f)}" for f in TUNE_GRID if getattr(launch, f) != getattr(LAUNCH, f))
        print(f"| {fields or 'default'} | " + " | ".join(f"{r:.2f}" for r in ratios)
              + f" | {math.prod(ratios) ** (1 / len(ratios)):.3f} |")
    print(f"\nbest: {best}")
    return best


if __name__ == "__main__":
    run()
