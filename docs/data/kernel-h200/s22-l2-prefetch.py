"""Can a layer's o_proj weights stream into L2 while its attention runs, so that the projection after it reads
L2 instead of HBM? At batch 1 the sparse attention call runs at about 2.3x its bytes floor (latency, not
bandwidth), and o_proj (34 MB, fits the 50 MB L2) at 1.8x. Per layer, captured in one CUDA graph over 4
layers (each its own KV pool and weight, so both are cold at the layer's start), Llama-3.1-8B shapes, 128K:

  serial:    attention, then o_proj
  prefetch:  a side stream reads o_proj's weight (kept in L2: evict-last) while the attention runs, then o_proj
  *, kv evict-first: the same with the attention's K/V loads marked evict-first (Launch.evict_first of 1243d1b)

On the GPU machine, with the kernel of 1243d1b: PYTHONPATH=. python3 docs/data/kernel-h200/s22-l2-prefetch.py"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

from sparsedecode.bench.kernel_bench import hybrid, make_cache
from sparsedecode.kernels.sparse_decode import Launch

LAYERS = 4
HIDDEN = 4096
dev = torch.device("cuda")


@triton.jit
def _read_into_l2(w, n, sink, BLOCK: tl.constexpr):
    """Reads BLOCK elements of w (kept in L2 as evict-last); the sum's impossible test keeps the loads."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(w + offs, mask=offs < n, other=0.0, eviction_policy="evict_last")
    total = tl.sum(x.to(tl.float32), 0)
    if total == 1.0e30:
        tl.store(sink, total)


def read_into_l2(w: torch.Tensor, sink: torch.Tensor, block: int = 8192) -> None:
    _read_into_l2[(triton.cdiv(w.numel(), block),)](w, w.numel(), sink, BLOCK=block, num_warps=4)


def graph_us(body) -> float:
    body()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return do_bench(graph.replay, return_mode="median") * 1e3 / LAYERS


def main() -> None:
    for batch in (1, 4):
        gen = torch.Generator(device="cuda").manual_seed(batch)
        caches = [make_cache(batch, 131072, gen) for _ in range(LAYERS)]
        weights = [torch.randn(HIDDEN, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        sink = torch.zeros(1, device=dev)
        side = torch.cuda.Stream()
        outs = [None] * LAYERS

        def serial(launch):
            def body():
                for i in range(LAYERS):
                    out, _ = hybrid(caches[i], launch=launch)
                    outs[i] = F.linear(out.view(batch, HIDDEN), weights[i])
            return body

        def prefetched(launch):
            def body():
                for i in range(LAYERS):
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        read_into_l2(weights[i], sink)
                    out, _ = hybrid(caches[i], launch=launch)
                    torch.cuda.current_stream().wait_stream(side)
                    outs[i] = F.linear(out.view(batch, HIDDEN), weights[i])
            return body

        def attention_only(launch):
            def body():
                for i in range(LAYERS):
                    hybrid(caches[i], launch=launch)
            return body

        def linear_only(cold: bool):
            x = torch.randn(batch, HIDDEN, device=dev, dtype=torch.bfloat16)

            def body():
                for i in range(LAYERS):
                    F.linear(x, weights[i] if cold else weights[0])
            return body

        def read_only():
            for i in range(LAYERS):
                read_into_l2(weights[i], sink)

        plain, evict = Launch(), Launch(evict_first=1)
        serial(plain)()
        want = [o.clone() for o in outs]
        prefetched(plain)()
        assert all(torch.equal(a, b) for a, b in zip(want, outs)), "the prefetch changed the projection"
        rows = {
            "serial": graph_us(serial(plain)),
            "prefetch": graph_us(prefetched(plain)),
            "serial, kv evict-first": graph_us(serial(evict)),
            "prefetch, kv evict-first": graph_us(prefetched(evict)),
            "attention alone": graph_us(attention_only(plain)),
            "attention alone, kv evict-first": graph_us(attention_only(evict)),
            "o_proj alone, cold": graph_us(linear_only(True)),
            "o_proj alone, warm (the same weight 4 times)": graph_us(linear_only(False)),
            "the L2 read of o_proj's weight alone": graph_us(read_only),
        }
        print(f"\n128K, batch {batch}: us per layer (median of graph replays / {LAYERS})")
        print("| sequence | us | x serial |")
        print("|---|---:|---:|")
        for name, us in rows.items():
            print(f"| {name} | {us:.1f} | {us / rows['serial']:.3f} |", flush=True)
        del caches, weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
