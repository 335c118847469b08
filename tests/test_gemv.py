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
@pytest.mark.parametrize("x_tiles", [1, 2, 3])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
                                 (10240, 8192), (57344, 8192), (8192, 28672), (1152, 576), (151936, 1536)])
def test_default_launches_fit_in_shared_memory(n, k, element_size, x_tiles):
    """Triton buffers num_stages - 1 tiles of each input and of the weight: the defaults fit an H200's shared
    memory (a float32 launch at bf16's tile depth asked for 288 KiB), and an A100's, with the prologues' extra
    inputs; the 8B layers in bf16 keep the depths they were timed at."""
    from sparsedecode.kernels.gemv import HOPPER_SHARED_MEMORY, buffered_bytes, gemv_launch

    for shared_memory in (HOPPER_SHARED_MEMORY, 166912):
        launch = gemv_launch(n, k, element_size, x_tiles, shared_memory)
        assert buffered_bytes(launch, element_size, x_tiles) <= shared_memory
    timed = {(6144, 4096): 256, (4096, 4096): 512, (28672, 4096): 256, (4096, 14336): 512, (128256, 4096): 256}
    if element_size == 2 and x_tiles == 1 and (n, k) in timed:
        assert gemv_launch(n, k).block_k == timed[n, k]
    if element_size == 4 and x_tiles == 1 and n <= 4096:
        assert buffered_bytes(GemvLaunch(32, 512), 4) > HOPPER_SHARED_MEMORY  # so float32 tiles are shallower
        assert gemv_launch(n, k, 4).block_k == 256


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(3))
def test_prologue_ops_match_their_references(device, dtype, seed):
    """`add_rmsnorm_linear_rows` (one or two residuals) and `silu_mul_linear_rows` against their references:
    rows 1-16, K over several tiles and not a multiple of one, N not a multiple of the tile, with and without
    bias; the residual stream's sum comes back as stored."""
    from sparsedecode.kernels import add_rmsnorm_gemv_ref, silu_mul_gemv_ref
    from sparsedecode.kernels.gemv import add_rmsnorm_linear_rows, silu_mul_linear_rows

    gen = torch.Generator().manual_seed(200 + seed)
    rows, n = int(torch.randint(1, MAX_ROWS + 1, (1,), generator=gen)), int(torch.randint(1, 100, (1,), generator=gen))
    k = int(torch.randint(520, 1300, (1,), generator=gen))
    x, weight, bias = random_case(seed, device, dtype, rows, n, k, bias=seed != 1, strided_x=False)
    residuals = tuple(random_case(seed + 10 + i, device, dtype, rows, n, k, False, False)[0] for i in range(2))
    norm_weight = (torch.rand(k, generator=gen) + 0.5).to(device, dtype)
    for used in (residuals[:1], residuals):
        total, y = add_rmsnorm_linear_rows(x, *used, *([None] if len(used) == 1 else []), norm_weight, 1e-5,
                                           weight, bias)
        want_total, want_y = add_rmsnorm_gemv_ref(x, used, norm_weight, 1e-5, weight, bias)
        torch.testing.assert_close(total, want_total, **TOL[dtype])
        torch.testing.assert_close(y, want_y, **TOL[dtype])
    gate_up = torch.randn(rows, 2 * k, generator=gen).to(device, dtype)
    torch.testing.assert_close(silu_mul_linear_rows(gate_up, weight, bias), silu_mul_gemv_ref(gate_up, weight, bias),
                               **TOL[dtype])


def rope_tables(gen: torch.Generator, rows: int, head_dim: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [rows, head_dim] as the engine gathers them: views of one [rows, 2, head_dim] table."""
    angles = torch.rand(rows, head_dim // 2, generator=gen) * 6
    angles = torch.cat((angles, angles), dim=-1)
    table = torch.stack((angles.cos(), angles.sin()), dim=1).to(device, dtype)
    return table[:, 0], table[:, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(3))
def test_rotating_qkv_matches_its_reference(device, dtype, seed):
    """`add_rmsnorm_linear_rows` with cos/sin: the first heads of the projection (q and k) rotated, the rest (v)
    not; head_dim 32, 64 and 128, with and without bias."""
    from sparsedecode.kernels import add_rmsnorm_gemv_ref
    from sparsedecode.kernels.gemv import add_rmsnorm_linear_rows

    gen = torch.Generator().manual_seed(300 + seed)
    head_dim = (32, 64, 128)[seed]
    heads = int(torch.randint(2, 7, (1,), generator=gen))
    rotated = int(torch.randint(1, heads, (1,), generator=gen)) * head_dim
    rows, k = int(torch.randint(1, MAX_ROWS + 1, (1,), generator=gen)), int(torch.randint(64, 700, (1,), generator=gen))
    x, weight, bias = random_case(seed, device, dtype, rows, heads * head_dim, k, bias=seed != 1, strided_x=False)
    residual = random_case(seed + 20, device, dtype, rows, 1, k, False, False)[0]
    norm_weight = (torch.rand(k, generator=gen) + 0.5).to(device, dtype)
    cos, sin = rope_tables(gen, rows, head_dim, device, dtype)
    total, y = add_rmsnorm_linear_rows(x, residual, None, norm_weight, 1e-5, weight, bias, False, cos, sin, rotated)
    want_total, want_y = add_rmsnorm_gemv_ref(x, (residual,), norm_weight, 1e-5, weight, bias, (cos, sin, rotated))
    torch.testing.assert_close(total, want_total, **TOL[dtype])
    torch.testing.assert_close(y, want_y, **TOL[dtype])
    unrotated = add_rmsnorm_gemv_ref(x, (residual,), norm_weight, 1e-5, weight, bias)[1]
    torch.testing.assert_close(y[:, rotated:], unrotated[:, rotated:], **TOL[dtype])
    assert not torch.allclose(y[:, :rotated].float(), unrotated[:, :rotated].float(), atol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_prologue_ops_at_llama_8b_shapes_on_gpu():
    """The launches of the 8B layers with their prologues compile within the GPU's shared memory."""
    from sparsedecode.kernels import add_rmsnorm_gemv_ref, silu_mul_gemv_ref
    from sparsedecode.kernels.gemv import add_rmsnorm_linear_rows, silu_mul_linear_rows

    for n, residuals in ((6144, 2), (28672, 1)):  # qkv_proj after x + o + m, gate_up_proj after x + o
        x, weight, _ = random_case(n, "cuda", torch.bfloat16, 6, n, 4096, bias=False, strided_x=False)
        parts = [random_case(i, "cuda", torch.bfloat16, 6, 1, 4096, False, False)[0] for i in range(residuals)]
        norm_weight = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
        rope = (*rope_tables(torch.Generator().manual_seed(0), 6, 128, "cuda", torch.bfloat16), 5120)
        for rope_args in ((None, None, 0), rope) if n == 6144 else ((None, None, 0),):
            got = add_rmsnorm_linear_rows(x, *parts, *([None] * (2 - residuals)), norm_weight, 1e-5, weight, None,
                                          True, *rope_args)
            for g, w in zip(got, add_rmsnorm_gemv_ref(x, tuple(parts), norm_weight, 1e-5, weight, None,
                                                      rope_args if rope_args[0] is not None else None)):
                torch.testing.assert_close(g, w, **TOL[torch.bfloat16])
    gate_up, weight, _ = random_case(3, "cuda", torch.bfloat16, 6, 4096, 2 * 14336, bias=False, strided_x=False)
    torch.testing.assert_close(silu_mul_linear_rows(gate_up, weight[:, :14336].contiguous()),
                               silu_mul_gemv_ref(gate_up, weight[:, :14336]), **TOL[torch.bfloat16])


def test_prologue_ops_reject_bad_arguments():
    from sparsedecode.kernels.gemv import add_rmsnorm_linear_rows, silu_mul_linear_rows

    x, weight, bias = random_case(1, "cpu", torch.float32, 2, 32, 64, bias=True, strided_x=False)
    norm_weight = torch.ones(64)
    with pytest.raises(ValueError, match=r"the residuals must have x's shape, strides and dtype \(\(2, 64\)"):
        add_rmsnorm_linear_rows(x, x[:1], None, norm_weight, 1e-5, weight, bias)
    with pytest.raises(ValueError, match="the residuals must have x's shape, strides and dtype"):
        add_rmsnorm_linear_rows(x, x, x.double(), norm_weight, 1e-5, weight, bias)
    with pytest.raises(ValueError, match=r"norm_weight must be \[64\], not \(32,\)"):
        add_rmsnorm_linear_rows(x, x, None, norm_weight[:32], 1e-5, weight, bias)
    cos, sin = rope_tables(torch.Generator().manual_seed(0), 2, 32, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"cos and sin must both be \[2, head_dim\] with the same strides"):
        add_rmsnorm_linear_rows(x, x, None, norm_weight, 1e-5, weight, bias, False, cos[:1], sin[:1], 32)
    with pytest.raises(ValueError, match="a head_dim that is a multiple of 32 and divides its 32 columns and the 48"):
        add_rmsnorm_linear_rows(x, x, None, norm_weight, 1e-5, weight, bias, False, cos, sin, 48)
    with pytest.raises(ValueError, match=r"gate_up must be \[M, 128\] for weight \(32, 64\), not \(2, 64\)"):
        silu_mul_linear_rows(x, weight)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_op_is_the_kernel(device):
    """`linear_rows` (what a compiled decode step calls) gives `gemv`'s bits at the default launch."""
    from sparsedecode.kernels.gemv import linear_rows

    x, weight, bias = random_case(5, device, torch.bfloat16, 3, 6144, 256, bias=True, strided_x=False)
    assert torch.equal(linear_rows(x, weight, bias), gemv(x, weight, bias))
    assert torch.equal(torch.ops.sparsedecode.linear_rows(x, weight, None), gemv(x, weight))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decode_linear", ["gemv", "gemv-fused"])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_decode_forward_through_gemv_matches_cublas_path(device, decode_linear, head_dim, monkeypatch):
    """A fused forward with `decode_linear` "gemv" sends each layer's four projections, and the logits' lm_head,
    through the kernel; "gemv-fused" sends qkv_proj, gate_up_proj and the lm_head through the norm prologue
    (qkv_proj also rotating q and k where head_dim is a multiple of 32) and down_proj through the SiLU one.
    The logits are those of F.linear. More rows than MAX_ROWS (a prefill) stay on F.linear."""
    from sparsedecode import LLM
    from sparsedecode.kernels import sparse_decode_attention_ref
    from sparsedecode.models import shapes, transformer

    tiny = shapes.SHAPES["tiny-llama"]
    monkeypatch.setitem(shapes.SHAPES, "tiny-llama-test", {**tiny, "num_attention_heads": 128 // head_dim})
    llm = LLM("random:tiny-llama-test", device="cpu", dtype=torch.float32, block_size=16, max_context=256)
    model, config = llm.model.to(device), llm.config
    assert config.head_dim == head_dim
    rotations, apply_rope = [], transformer.apply_rope
    monkeypatch.setattr(transformer, "apply_rope", lambda *args: rotations.append(1) or apply_rope(*args))
    keys = torch.randn(20, config.num_kv_heads, 40, config.head_dim, generator=torch.Generator().manual_seed(0))
    keys = keys.to(device)
    calls = []
    for name in ("linear_rows", "add_rmsnorm_linear_rows", "silu_mul_linear_rows"):
        op = getattr(transformer, name)
        monkeypatch.setattr(transformer, name, lambda *args, op=op, name=name: calls.append(name) or op(*args))
    per_layer = (["linear_rows"] * 4 if decode_linear == "gemv" else
                 ["add_rmsnorm_linear_rows", "linear_rows", "add_rmsnorm_linear_rows", "silu_mul_linear_rows"])
    lm_head = "linear_rows" if decode_linear == "gemv" else "add_rmsnorm_linear_rows"  # after the last sum, norm
    for rows in (3, 20):
        tokens = torch.arange(rows, device=device) * 7 % config.vocab_size
        positions = torch.arange(rows, device=device) + 20
        lens = torch.full((rows,), 40, device=device)

        def attention(layer, q, k, v):
            return sparse_decode_attention_ref(q, keys[:rows], keys[:rows], lens, llm.method.scale)[0]

        want = model.logits(model.forward(tokens, positions, attention, fused=True))
        torch.testing.assert_close(model.decode_logits(tokens, positions, attention, fused=True), want)
        model.decode_linear = decode_linear
        rotations.clear()
        got = model.decode_logits(tokens, positions, attention, fused=True)
        model.decode_linear = "torch"
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert calls == (per_layer * config.num_layers + [lm_head] if rows <= MAX_ROWS else [])
        rope_in_kernel = decode_linear == "gemv-fused" and head_dim == 32 and rows <= MAX_ROWS
        assert len(rotations) == (0 if rope_in_kernel else config.num_layers)
        calls.clear()


def test_gemv_fused_steps_launch_dependently_outside_the_compiled_graphs(monkeypatch):
    """With gemv-fused nothing after the attention is left for Inductor: a fused forward runs that part
    uncompiled, where the gemv ops launch dependently (`kernels.pdl`); inside torch.compile they do not."""
    from sparsedecode import LLM
    from sparsedecode.models import transformer

    monkeypatch.setattr(transformer, "pdl_enabled", lambda device: True)  # as on a Hopper GPU
    x = torch.zeros(2, 4)
    assert transformer.dependent_launch(x)
    assert not torch.compile(transformer.dependent_launch, backend="eager", fullgraph=True)(x)

    model = LLM("random:tiny-llama", device="cpu", dtype=torch.float32).model
    model.residual_and_qkv = transformer.DecoderLayer.residual_and_qkv  # as compiled, without compiling
    model.residual_updates = lambda *args: pytest.fail("gemv-fused ran the compiled residual_updates")
    model.decode_linear = "gemv-fused"
    launched = []  # the ops' pdl flags (kernels.pdl itself keeps the CPU interpreter's launches plain)
    for name in ("linear_rows", "silu_mul_linear_rows"):
        monkeypatch.setattr(transformer, name, lambda *args, op=getattr(transformer, name): launched.append(args[-1])
                            or op(*args))
    tokens = torch.tensor([3, 5])

    def attention(layer, q, k, v):
        return q

    model.forward(tokens, torch.tensor([0, 1]), attention, fused=True)
    assert launched == [True] * 2 * model.config.num_layers
    model.decode_linear = "gemv"
    with pytest.raises(pytest.fail.Exception, match="ran the compiled residual_updates"):
        model.forward(tokens, torch.tensor([0, 1]), attention, fused=True)


def test_llm_refuses_gemv_where_decode_steps_are_not_compiled():
    from sparsedecode import LLM

    assert LLM("random:tiny-llama", device="cpu").decode_linear == "torch"  # what "auto" is without compiled steps
    for linears in ("gemv", "gemv-fused"):
        with pytest.raises(ValueError, match=f"decode_linear='{linears}' runs in the compiled decode steps of a CUDA"):
            LLM("random:tiny-llama", device="cpu", decode_linear=linears)
    with pytest.raises(ValueError, match="decode_linear 'cutlass' is not one of auto, torch, gemv, gemv-fused"):
        LLM("random:tiny-llama", device="cpu", decode_linear="cutlass")


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the CPU cases ran in this process")
def test_cpu_cases_in_a_fresh_process():
    run_in_fresh_process(__file__)
