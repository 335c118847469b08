"""The decode step's projections alone (Llama-3.1-8B shapes, bf16) at small batch: cuBLAS through F.linear
(its default and cublasLt), and Inductor's max-autotune of the same linear at batches 1 and 6. Each timing is
one CUDA graph of the projection over 8 weight copies in turn (cold in L2, as the step's layers are), median
of do_bench over its replays / 8; floor = weight bytes / the copy bandwidth of `bench e2e`. On the GPU
machine: PYTHONPATH=. python3 docs/data/kernel-h200/s21-gemv.py"""
import torch
import torch.nn.functional as F
from triton.testing import do_bench

from sparsedecode.bench.common import measure_copy_bandwidth

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
BATCHES = (1, 2, 4, 6, 8)
COPIES = 8
dev = torch.device("cuda")
bandwidth = measure_copy_bandwidth(dev)
print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)")


def time_us(fn, x, ws):
    for w in ws:
        fn(x, w)  # compile / autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in ws:
            fn(x, w)
    return do_bench(graph.replay, return_mode="median") * 1e3 / len(ws)


compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
print("| proj | M | floor us | cublas us (x floor) | cublasLt | inductor max-autotune |")
print("|---|---|---|---|---|---|")
totals = {}
for name, (n, k) in SHAPES.items():
    copies = 2 if name == "lm_head" else COPIES  # 1 GB each: two are cold in L2 already
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    floor = n * k * 2 / bandwidth * 1e6
    for m in BATCHES:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x, ws[0])
        cells = [time_us(F.linear, x, ws)]
        torch.backends.cuda.preferred_blas_library("cublaslt")
        torch.testing.assert_close(F.linear(x, ws[0]), ref, rtol=2e-2, atol=2e-2)
        cells.append(time_us(F.linear, x, ws))
        torch.backends.cuda.preferred_blas_library("cublas")
        if m in (1, 6) and name != "lm_head":
            torch.testing.assert_close(compiled(x, ws[0]), ref, rtol=2e-2, atol=2e-2)
            cells.append(time_us(compiled, x, ws))
        else:
            cells.append(float("nan"))
        for i, c in enumerate(cells):
            totals[(m, i)] = totals.get((m, i), 0.0) + c * (1 if name == "lm_head" else 32)
        print(f"| {name} | {m} | {floor:.1f} | " + " | ".join(f"{c:.1f} ({c / floor:.2f}x)" for c in cells) + " |",
              flush=True)
    del ws
weights_floor = sum(n * k * (1 if name == "lm_head" else 32) for name, (n, k) in SHAPES.items()) * 2 / bandwidth * 1e6
print(f"\nper step (32 layers + lm_head), us; floor {weights_floor:.0f}:")
for m in BATCHES:
    print(f"M={m}: cublas {totals[(m, 0)]:.0f}, cublasLt {totals[(m, 1)]:.0f}")
