"""The one-launch K/V store into the paged pool against its PyTorch reference.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (see triton_cpu); with CUDA the
same cases also run compiled on the GPU. A store is a copy: results must be equal bit for bit, and
every place not written must keep its poison.
"""
import importlib

import torch

from triton_cpu import devices, interpreted, run_in_fresh_process  # sets TRITON_INTERPRET

import pytest  # noqa: E402

from sparsedecode.kernels import store_kv, store_kv_ref  # noqa: E402

INTERPRET = interpreted(importlib.import_module("sparsedecode.kernels.store_kv")._store_kv_kernel)
NEEDS_FRESH_PROCESS = not INTERPRET and not torch.cuda.is_available()
DEVICES = devices(INTERPRET)
POISON = 1e4


def make_case(seed, device, dtype, layers, blocks, kv_heads, page, dim, tokens, strided):
    """Poisoned pools [L, NB, Hkv, P, D], distinct random places, new k / v (strided views of one
    projection output when `strided`, as the model's fused QKV gives them)."""
    gen = torch.Generator().manual_seed(seed)
    pools = [torch.full((layers, blocks, kv_heads, page, dim), POISON, dtype=dtype, device=device) for _ in range(2)]
    places = torch.randperm(blocks * page, generator=gen)[:tokens]
    block_ids, offsets = (places // page).to(device), (places % page).to(device)
    if strided:
        fused = torch.randn(tokens, 3 * kv_heads * dim, generator=gen).to(device, dtype)
        k, v = (fused[:, i * kv_heads * dim:(i + 1) * kv_heads * dim].view(tokens, kv_heads, dim) for i in (1, 2))
    else:
        k, v = (torch.randn(tokens, kv_heads, dim, generator=gen).to(device, dtype) for _ in range(2))
    return pools, block_ids, offsets, k, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layer_as", ["int", "tensor", "0-dim"])
@pytest.mark.parametrize("shape", [(3, 7, 2, 16, 64, 9, False, 1), (2, 5, 3, 32, 64, 40, True, 0),
                                   (4, 3, 1, 16, 128, 1, True, 3), (2, 40, 8, 16, 256, 12, False, 1)])
def test_matches_reference_and_writes_nothing_else(device, dtype, layer_as, shape):
    """Equal to the reference bit for bit; every other place of both pools (other layers, blocks, slots)
    keeps its poison. Hkv * D not a power of two, several programs per token in the last shape."""
    layers, blocks, kv_heads, page, dim, tokens, strided, layer = shape
    (k_pool, v_pool), block_ids, offsets, k, v = make_case(sum(shape[:6]), device, dtype, layers, blocks, kv_heads,
                                                           page, dim, tokens, strided)
    want_k, want_v = k_pool.clone(), v_pool.clone()
    store_kv_ref(want_k, want_v, layer, block_ids, offsets, k, v)
    which = {"int": layer, "tensor": torch.tensor([layer], device=device), "0-dim": torch.tensor(layer, device=device)}
    store_kv(k_pool, v_pool, which[layer_as], block_ids.int(), offsets, k, v, backend="triton")
    assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)
    written = torch.zeros(layers, blocks, page, dtype=torch.bool, device=device)
    written[layer, block_ids, offsets] = True
    for pool, new in ((k_pool, k), (v_pool, v)):
        assert torch.equal(pool[layer, block_ids, :, offsets], new)
        assert (pool.transpose(2, 3)[~written] == POISON).all()


@pytest.mark.parametrize("device", DEVICES)
def test_no_tokens(device):
    (k_pool, v_pool), block_ids, offsets, k, v = make_case(0, device, torch.float32, 1, 2, 1, 16, 32, 0, False)
    store_kv(k_pool, v_pool, 0, block_ids, offsets, k, v, backend="triton")
    assert (k_pool == POISON).all() and (v_pool == POISON).all()


def test_auto_backend_on_cpu_is_the_reference():
    (k_pool, v_pool), block_ids, offsets, k, v = make_case(1, "cpu", torch.float32, 2, 4, 2, 16, 32, 5, False)
    want_k, want_v = k_pool.clone(), v_pool.clone()
    store_kv_ref(want_k, want_v, 1, block_ids, offsets, k, v)
    store_kv(k_pool, v_pool, torch.tensor([1]), block_ids, offsets, k, v)
    assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)


def test_rejects_bad_arguments():
    (k_pool, v_pool), block_ids, offsets, k, v = make_case(2, "cpu", torch.float32, 2, 4, 2, 16, 32, 5, False)
    with pytest.raises(ValueError, match="bad shapes"):
        store_kv(k_pool, v_pool, 0, block_ids, offsets[:3], k, v)
    with pytest.raises(ValueError, match="bad shapes"):
        store_kv(k_pool, v_pool, 0, block_ids, offsets, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="dtype"):
        store_kv(k_pool, v_pool, 0, block_ids, offsets, k.double(), v.double())
    with pytest.raises(ValueError, match="layer"):
        store_kv(k_pool, v_pool, torch.tensor([0, 1]), block_ids, offsets, k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_graph_replay_follows_the_layer_and_places():
    """One captured store serves every layer: replays follow a layer, places and values written in place."""
    (k_pool, v_pool), block_ids, offsets, k, v = make_case(3, "cuda", torch.bfloat16, 4, 16, 2, 16, 128, 6, False)
    layer = torch.zeros(1, dtype=torch.int64, device="cuda")
    store_kv(k_pool, v_pool, layer, block_ids, offsets, k, v)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        store_kv(k_pool, v_pool, layer, block_ids, offsets, k, v)
    want_k, want_v = k_pool.clone(), v_pool.clone()
    for step in range(1, 4):
        _, new_ids, new_offsets, new_k, new_v = make_case(3 + step, "cuda", torch.bfloat16, 4, 16, 2, 16, 128, 6, False)
        for dst, src in ((layer, torch.tensor([step])), (block_ids, new_ids), (offsets, new_offsets), (k, new_k),
                         (v, new_v)):
            dst.copy_(src)
        graph.replay()
        store_kv_ref(want_k, want_v, step, new_ids, new_offsets, new_k, new_v)
        assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the CPU cases ran in this process")
def test_cpu_cases_in_a_fresh_process():
    run_in_fresh_process(__file__)
