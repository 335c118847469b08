"""The one-launch block gather of KV offload against its PyTorch reference.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (see triton_cpu); with CUDA the
same cases run compiled, the sources in pinned host memory read in place over the host link (a pool
page-locked by `offload.cache.host_tensor`, and PyTorch's own pinned memory). A move is a copy: results
must be equal bit for bit, and every slab not moved to must keep its poison.
"""
import importlib

import torch

from triton_cpu import devices, interpreted, run_in_fresh_process  # sets TRITON_INTERPRET

import pytest  # noqa: E402

from sparsedecode.kernels.gather_host_blocks import gather_host_blocks, gather_host_blocks_ref  # noqa: E402

INTERPRET = interpreted(importlib.import_module("sparsedecode.kernels.gather_host_blocks")._gather_kernel)
NEEDS_FRESH_PROCESS = not INTERPRET and not torch.cuda.is_available()
POISON = 1e4


def sources(kind: str, shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    """K and V source pools: on the device ("device"), page-locked in place ("registered") or from
    PyTorch's pinned allocator ("pinned"); the last two live in host memory."""
    values = [torch.randn(shape, generator=gen).to(dtype) for _ in range(2)]
    if kind == "device":
        return [x.cuda() for x in values]
    if kind == "pinned":
        return [x.pin_memory() for x in values]
    from sparsedecode.offload.cache import host_tensor

    pools = [host_tensor(shape, dtype, pinned=True) for _ in range(2)]
    for pool, x in zip(pools, values):
        pool.copy_(x)
    return pools


CASES = [pytest.param("cpu", "cpu", marks=devices(INTERPRET)[0].marks)] + [
    pytest.param("cuda", kind, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))
    for kind in ("device", "registered", "pinned")
]


@pytest.mark.parametrize("device,source", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("slab,moves,skipped", [(16 * 64, 9, 3), (64 * 128, 40, 17), (3 * 32, 5, 0), (4096 + 64, 2, 1)])
def test_matches_reference_and_moves_nothing_else(device: str, source: str, dtype: torch.dtype, slab: int,
                                                  moves: int, skipped: int) -> None:
    """Equal to the reference bit for bit; skipped moves (source -1) and slabs no move targets keep their
    poison. Slabs not a power of two and wider than one program's tile included."""
    gen = torch.Generator().manual_seed(slab + moves)
    if device == "cuda":
        k_src, v_src = sources(source, (50, slab), dtype, gen)
    else:
        k_src, v_src = (torch.randn(50, slab, generator=gen).to(dtype) for _ in range(2))
    targets = [torch.full((3 * moves, slab), POISON, dtype=dtype, device=device) for _ in range(2)]
    src = torch.randint(0, 50, (moves,), generator=gen)
    src[torch.randperm(moves, generator=gen)[:skipped]] = -1
    dst = torch.randperm(3 * moves, generator=gen)[:moves]
    want = [t.clone() for t in targets]
    gather_host_blocks_ref(k_src, v_src, *want, src.to(device), dst.to(device))
    gather_host_blocks(k_src, v_src, *targets, src.to(device), dst.to(device), backend="triton")
    assert torch.equal(targets[0], want[0]) and torch.equal(targets[1], want[1])
    moved = dst[src >= 0]
    untouched = torch.ones(3 * moves, dtype=torch.bool)
    untouched[moved] = False
    for target, pool in zip(targets, (k_src, v_src)):
        assert torch.equal(target[moved.to(device)].cpu(), pool[src[src >= 0].to(pool.device)].cpu())
        assert (target[untouched.to(device)] == POISON).all()


def test_bad_input_is_refused() -> None:
    pools = [torch.zeros(4, 8) for _ in range(4)]
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="one slab width"):
        gather_host_blocks(torch.zeros(4, 16), *pools[1:], ids, ids)
    with pytest.raises(ValueError, match="share a dtype"):
        gather_host_blocks(pools[0].double(), *pools[1:], ids, ids)
    with pytest.raises(ValueError, match="1-D integer tensors of one length"):
        gather_host_blocks(*pools, ids, ids[:1])


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the interpreter runs in this process")
def test_cpu_cases_in_a_fresh_process() -> None:
    run_in_fresh_process(__file__)
