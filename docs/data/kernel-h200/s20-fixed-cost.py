"""Run on the GPU machine from the repository root: python3 docs/data/kernel-h200/s20-fixed-cost.py

Where the hybrid call's time over its floor goes at batch 1: the partial kernel's device time (profiler)
and the graph replay (do_bench) on workloads from nothing to the full layer, same pools and launch."""
import torch
from sparsedecode.bench import kernel_bench as kb
from sparsedecode.bench.common import kernel_times
from sparsedecode.kernels import sparse_decode_attention

bw = kb.copy_bandwidth()
print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
ctx = 131072
caches = kb.make_caches(ctx, 1)
units = ctx // kb.UNIT


def call(c, count, full, lse=True):
    counts = torch.full_like(c["counts"], count)
    fl = torch.zeros_like(c["full"])
    if full:
        fl[:, 0] = True
    return lambda: sparse_decode_attention(c["q"], c["k"], c["v"], c["lens"], kb.SCALE, kb.UNIT, c["lists"], counts,
                                           fl, c["unit_lse"] if lse else None, sorted_lists=True,
                                           block_tables=c["tables"])


print("| workload | KV MB | floor us | replay us | partial kernel us | merge us | other us |")
print("|---|---|---|---|---|---|---|")
for name, count, full in [("nothing (0 units a row)", 0, False), ("1 unit per row (8 rows)", 1, False),
                          ("2 units per row", 2, False), ("10 units per row", 10, False),
                          ("64 units per row, no full row", 64, False), ("1 full row only", 0, True),
                          ("the layer: 1 full row + 7 x 64 units", 64, True)]:
    per_row = [count] * 8
    if full:
        per_row[0] = units
    mb = sum(per_row) * kb.UNIT * kb.HEAD_DIM * 2 * 2 / 1e6
    us = kb.timed([call(c, count, full) for c in caches])
    times = dict(kernel_times(call(caches[0], count, full), steps=20))
    part = sum(t for n, t in times.items() if "_partial" in n) * 1e6
    merge = sum(t for n, t in times.items() if "_merge" in n) * 1e6
    other = sum(times.values()) * 1e6 - part - merge
    print(f"| {name} | {mb:.1f} | {mb * 1e12 / bw:.1f} | {us:.1f} | {part:.1f} | {merge:.1f} | {other:.1f} |", flush=True)
