"""The few-row linear layer (`kernels.gemv`) against its PyTorch reference, over random shapes.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (see triton_cpu); with CUDA the same
cases also run compiled on the GPU.
"""
import importlib

import torch

from triton_cpu import devices, fix_interpreter, interpreted, run_in_fresh_process  # sets TRITON_INTERPRET

import pytest  # noqa: E402

from sparsedecode.kernels import gemv, gemv_ref  # noqa: E402
from sparsedecode.kernels.gemv import MAX_ROWS, GemvLaunch  # noqa: E402

INTERPRET = interpreted(importlib.import_module("sparsedecode.kernels.gemv")._gemv_kernel)
NEEDS_FRESH_PROCESS = not INTERPRET and not torch.cuda.is_available()
if INTERPRET:
    fix_interpreter()
DEVICES = devices(INTERPRET)
TOL = {torch.float32: dict(atol=1e-3, rtol=1e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}


def random_case(seed: int, device, dtype, rows: int, n: int, k: int, bias: bool, strided_x: bool):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k + 8 if strided_x else k, generator=gen)[:, :k]  # a row stride other than K
    weight = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) if bias else None
    return (x.to(device, dtype), weight.to(device, dtype), None if b is None else b.to(device, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_over_random_shapes(device, dtype, seed):
    """Rows 1-16, N not a multiple of the tile, K a multiple of block_k or not, with and without bias."""
    gen = torch.Generator().manual_seed(100 + seed)
    rows = int(torch.randint(1, MAX_ROWS + 1, (1,), generator=gen))
    n = int(torch.randint(1, 200, (1,), generator=gen))
    k = int(torch.randint(1, 5, (1,), generator=gen)) * 64 + (0 if seed % 2 else 24)
    launch = GemvLaunch(block_n=[16, 32][seed % 2], block_k=[64, 128][seed // 2], num_stages=2)
    x, weight, bias = random_case(seed, device, dtype, rows, n, k, bias=seed % 3 == 0, strided_x=seed == 1)
    got = gemv(x, weight, bias, launch)
    assert got.shape == (rows, n) and got.dtype == dtype
    torch.testing.assert_close(got, gemv_ref(x, weight, bias), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_rows_do_not_mix(device):
    """Each output row depends on its own input row only: a row of zeros gives the bias alone."""
    x, weight, bias = random_case(7, device, torch.float32, 5, 48, 128, bias=True, strided_x=False)
    x[2] = 0
    got = gemv(x, weight, bias, GemvLaunch(block_n=16, block_k=64))
    torch.testing.assert_close(got[2], bias)
    torch.testing.assert_close(got[[0, 1, 3, 4]], gemv(x[[0, 1, 3, 4]], weight, bias, GemvLaunch(16, 64)))


def test_rejects_bad_arguments():
    x, weight, bias = random_case(1, "cpu", torch.float32, 2, 32, 64, bias=True, strided_x=False)
    with pytest.raises(ValueError, match=r"takes 1 to 16 rows, not 17: use torch.nn.functional.linear"):
        gemv(torch.zeros(17, 64), weight)
    with pytest.raises(ValueError, match=r"x \[M, K\] and weight \[N, K\]"):
        gemv(x, weight[:, :32])
    with pytest.raises(ValueError, match=r"bias must be \[32\]"):
        gemv(x, weight, bias[:5])
    with pytest.raises(ValueError, match="share a dtype"):
        gemv(x, weight.double())
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        gemv(x, weight.T.contiguous().T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_graph_replay_follows_new_rows():
    x, weight, bias = random_case(3, "cuda", torch.bfloat16, 4, 4096, 1024, bias=True, strided_x=False)
    gemv(x, weight, bias)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv(x, weight, bias)
    for seed in range(3):
        x.copy_(random_case(10 + seed, "cuda", torch.bfloat16, 4, 4096, 1024, bias=False, strided_x=False)[0])
        graph.replay()
        torch.testing.assert_close(y, gemv_ref(x, weight, bias), **TOL[torch.bfloat16])


@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
                                 (10240, 8192), (57344, 8192), (8192, 28672), (1152, 576), (151936, 1536)])
def test_default_launches_fit_in_shared_memory(n, k, element_size):
    """Triton buffers num_stages - 1 tiles of x (16 rows) and of the weight; the defaults must fit a Hopper
    SM's 227 KiB in bf16 and in float32 (a float32 launch at bf16's tile depth asked for 288 KiB)."""
    from sparsedecode.kernels.gemv import gemv_launch

    launch = gemv_launch(n, k, element_size)
    assert (16 + launch.block_n) * launch.block_k * element_size * (launch.num_stages - 1) <= 227 * 1024


@pytest.mark.parametrize("device", DEVICES)
def test_custom_op_is_the_kernel(device):
    """`linear_rows` (what a compiled decode step calls) gives `gemv`'s bits at the default launch."""
    from sparsedecode.kernels.gemv import linear_rows

    x, weight, bias = random_case(5, device, torch.bfloat16, 3, 6144, 256, bias=True, strided_x=False)
    assert torch.equal(linear_rows(x, weight, bias), gemv(x, weight, bias))
    assert torch.equal(torch.ops.sparsedecode.linear_rows(x, weight, None), gemv(x, weight))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_forward_through_gemv_matches_cublas_path(device, monkeypatch):
    """A fused forward with `decode_gemv` sends each layer's four projections, and the logits' lm_head,
    through the kernel; the logits are those of F.linear. More rows than MAX_ROWS (a prefill) stay on F.linear."""
    from sparsedecode import LLM
    from sparsedecode.kernels import sparse_decode_attention_ref
    from sparsedecode.models import transformer

    llm = LLM("random:tiny-llama", device="cpu", dtype=torch.float32, block_size=16, max_context=256)
    model, config = llm.model.to(device), llm.config
    keys = torch.randn(20, config.num_kv_heads, 40, config.head_dim, generator=torch.Generator().manual_seed(0))
    keys = keys.to(device)
    calls, linear_rows = [], transformer.linear_rows
    monkeypatch.setattr(transformer, "linear_rows", lambda x, w, b: calls.append(w.shape) or linear_rows(x, w, b))
    for rows in (3, 20):
        tokens = torch.arange(rows, device=device) * 7 % config.vocab_size
        positions = torch.arange(rows, device=device) + 20
        lens = torch.full((rows,), 40, device=device)

        def attention(layer, q, k, v):
            return sparse_decode_attention_ref(q, keys[:rows], keys[:rows], lens, llm.method.scale)[0]

        want = model.logits(model.forward(tokens, positions, attention, fused=True))
        model.decode_gemv = True
        got = model.logits(model.forward(tokens, positions, attention, fused=True), fused=True)
        model.decode_gemv = False
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert len(calls) == (4 * config.num_layers + 1 if rows <= MAX_ROWS else 0)
        calls.clear()


def test_llm_refuses_gemv_where_decode_steps_are_not_compiled():
    from sparsedecode import LLM

    assert LLM("random:tiny-llama", device="cpu").decode_linear == "torch"  # what "auto" is without compiled steps
    with pytest.raises(ValueError, match="decode_linear='gemv' runs in the compiled decode steps of a CUDA device"):
        LLM("random:tiny-llama", device="cpu", decode_linear="gemv")
    with pytest.raises(ValueError, match="decode_linear 'cutlass' is not one of auto, torch, gemv"):
        LLM("random:tiny-llama", device="cpu", decode_linear="cutlass")


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the CPU cases ran in this process")
def test_cpu_cases_in_a_fresh_process():
    run_in_fresh_process(__file__)
