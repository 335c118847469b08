"""`kernels.decode_linear` against cuBLAS (F.linear) on the decode step's projections (Llama-3.1-8B shapes,
bf16), over a grid of launch settings. Each timing is one CUDA graph of the projection over 8 weight copies
in turn (cold in L2, as the step's layers are), median of do_bench over its replays / 8; floor = weight
bytes / the copy bandwidth of `bench e2e`. On the GPU machine:
PYTHONPATH=. python3 docs/data/kernel-h200/s21-decode-linear.py"""
import itertools
import math

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from sparsedecode.bench.common import measure_copy_bandwidth
from sparsedecode.kernels.decode_linear import LinearLaunch, decode_linear

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
BATCHES = (1, 6, 16)
COPIES = 8
GRID = [LinearLaunch(block_n=n, block_k=k, num_stages=s, num_warps=w)
        for n, k, s, w in itertools.product((16, 32, 64), (128, 256, 512), (3, 4, 6), (4, 8))]
dev = torch.device("cuda")
bandwidth = measure_copy_bandwidth(dev)
print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)")


def time_us(fn, x, ws):
    for w in ws:
        fn(x, w)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in ws:
            fn(x, w)
    return do_bench(graph.replay, return_mode="median") * 1e3 / len(ws)


results = {}  # (name, m) -> {"cublas": us, launch: us}
for name, (n, k) in SHAPES.items():
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
    for m in BATCHES:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x, ws[0])
        cell = {"cublas": time_us(F.linear, x, ws)}
        for launch in GRID:
            try:
                got = decode_linear(x, ws[0], launch=launch)
            except Exception as error:  # out of shared memory: not a candidate
                print(f"skip {launch}: {type(error).__name__}")
                continue
            torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
            cell[launch] = time_us(lambda x, w: decode_linear(x, w, launch=launch), x, ws)
        results[(name, m)] = cell
        floor = n * k * 2 / bandwidth * 1e6
        best = min((v, key) for key, v in cell.items() if key != "cublas")
        print(f"{name} M={m}: floor {floor:.1f} us, cublas {cell['cublas']:.1f}, best {best[0]:.1f} {best[1]}",
              flush=True)
    del ws

# the settings with the best geometric mean of (ours / cublas) over every shape and batch
common = set.intersection(*(set(c) - {"cublas"} for c in results.values()))
score = {launch: math.exp(sum(math.log(c[launch] / c["cublas"]) for c in results.values()) / len(results))
         for launch in common}
ranked = sorted(common, key=score.get)
print("\ngeometric mean of ours / cublas, best settings:")
for launch in ranked[:8]:
    print(f"{score[launch]:.3f} {launch}")
top = ranked[0]
print(f"\n| proj | M | floor us | cublas us (x floor) | ours, {top} | ours, default {LinearLaunch()} |")
print("|---|---|---|---|---|---|")
for (name, m), cell in results.items():
    n, k = SHAPES[name]
    floor = n * k * 2 / bandwidth * 1e6
    row = [cell["cublas"], cell[top], cell.get(LinearLaunch(), float("nan"))]
    print(f"| {name} | {m} | {floor:.1f} | " + " | ".join(f"{v:.1f} ({v / floor:.2f}x)" for v in row) + " |")
for m in BATCHES:
    step = {key: sum(results[(name, m)][key] for name in SHAPES) * 32 for key in ("cublas", top)}
    print(f"M={m}: 32 layers' projections, cublas {step['cublas']:.0f} us, ours {step[top]:.0f} us")
