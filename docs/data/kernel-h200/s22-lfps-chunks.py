"""The attention call of a lychee+lfps step between refreshes (every row a list: one KV head in eight scores
its LFPS candidates, 194 blocks, the others read the 64 blocks handed to them; per-block log-sum-exp on),
Llama-3.1-8B heads at 128K, under the work-splitting settings of `Launch`: the minimum chunk (512 tokens until
session 22, tuned on lychee's call, whose full row dominates; 128 since) and the work items per SM. Medians of CUDA-graph
replays over 4 caches (cold in L2). On the GPU machine: PYTHONPATH=. python3 docs/data/kernel-h200/s22-lfps-chunks.py
[FIELD=VALUE,...]... (the `Launch` settings to time, the first the reference of the ratios; default: the list below)"""
import sys

import torch

from sparsedecode.bench.kernel_bench import SCALE, UNIT, make_cache, timed
from sparsedecode.kernels import sparse_decode_attention
from sparsedecode.kernels.sparse_decode import Launch

CANDIDATES, HANDED = 194, 64
SETTINGS = [Launch(min_chunk_tokens=512), Launch(min_chunk_tokens=256), Launch(min_chunk_tokens=128),
            Launch(min_chunk_tokens=128, items_per_sm=3), Launch(min_chunk_tokens=128, items_per_sm=4),
            Launch(min_chunk_tokens=256, items_per_sm=3)]


def lfps_case(batch: int, gen: torch.Generator) -> dict:
    c = make_cache(batch, 131072, gen)
    units = c["unit_lse"].shape[-1]
    lists = torch.rand(batch, 8, units, device="cuda", generator=gen).argsort(-1)[..., :CANDIDATES]
    c["lists"] = lists.sort(-1).values.to(torch.int32).contiguous()
    c["counts"] = torch.full((batch, 8), HANDED, dtype=torch.int32, device="cuda")
    c["counts"][:, 0] = CANDIDATES
    c["full"] = torch.zeros(batch, 8, dtype=torch.bool, device="cuda")
    return c


def call(c: dict, launch: Launch):
    return sparse_decode_attention(c["q"], c["k"], c["v"], c["lens"], SCALE, UNIT, c["lists"], c["counts"],
                                   c["full"], c["unit_lse"], launch=launch, sorted_lists=True,
                                   block_tables=c["tables"])


def main(settings: list[Launch]) -> None:
    print("| batch | setting | us | x first |")
    print("|---|---|---:|---:|")
    for batch in (1, 4, 8):
        gen = torch.Generator(device="cuda").manual_seed(batch)
        cases = [lfps_case(batch, gen) for _ in range(4)]
        want = call(cases[0], Launch())[0].float()
        base = None
        for launch in settings:
            torch.testing.assert_close(call(cases[0], launch)[0].float(), want, atol=2e-2, rtol=2e-2)
            us = timed([lambda c=c, launch=launch: call(c, launch) for c in cases])
            base = base or us
            name = ", ".join(f"{k}={v}" for k, v in vars(launch).items() if v != getattr(Launch(), k)) or "default"
            print(f"| {batch} | {name} | {us:.1f} | {us / base:.3f} |", flush=True)
        del cases
        torch.cuda.empty_cache()


if __name__ == "__main__":
    given = [Launch(**{k: int(v) for k, v in (item.split("=") for item in arg.split(","))}) for arg in sys.argv[1:]]
    main(given or SETTINGS)
