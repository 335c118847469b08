"""KV offload on CPU (host and device one memory) and, where there is one, on the GPU: the CPU index
and the block pool against the op, layer-major prefill against chunk-major, offloaded decoding against
on-device decoding, bad input."""
from __future__ import annotations

import pytest
import torch

from sparsedecode import LLM
from sparsedecode.kernels import sparse_decode_attention
from sparsedecode.offload import OffloadConfig, OffloadedKVCache, offload_config
from sparsedecode.offload.scoring import block_lse
from recording import generate_recording

PROMPT = [(7 * i) % 500 + 1 for i in range(700)]


def random_lists(gen, batch, heads, width, num_blocks):
    lists = torch.randint(-1, num_blocks + 2, (batch, heads, width), generator=gen, dtype=torch.int32)
    counts = torch.randint(0, width + 1, (batch, heads), generator=gen, dtype=torch.int32)
    return lists, counts


def assert_same_scores(unit_a, lse_a, unit_b, lse_b) -> None:
    assert torch.equal(torch.isinf(unit_a), torch.isinf(unit_b))
    seen = torch.isfinite(unit_a)
    assert torch.allclose(unit_a[seen], unit_b[seen], atol=1e-5)
    assert torch.equal(torch.isinf(lse_a), torch.isinf(lse_b))
    assert torch.allclose(lse_a[torch.isfinite(lse_a)], lse_b[torch.isfinite(lse_a)], atol=1e-5)


@pytest.mark.parametrize("rows", ["lists", "mixed", "dense"])
def test_block_lse_matches_the_op(rows: str) -> None:
    gen = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, capacity, dim, unit = 2, 8, 2, 256, 16, 16
    q, k = torch.randn(batch, heads, dim, generator=gen), torch.randn(batch, kv_heads, capacity, dim, generator=gen)
    seq_lens = torch.tensor([200, 37], dtype=torch.int32)
    lists, counts = random_lists(gen, batch, kv_heads, 9, capacity // unit)
    lists, counts = (None, None) if rows == "dense" else (lists, counts)
    full = torch.tensor([[True, False], [False, False]]) if rows == "mixed" else None
    expected, got = torch.empty(batch, heads, capacity // unit), torch.empty(batch, heads, capacity // unit)
    _, lse = sparse_decode_attention(q, k, k, seq_lens, 0.3, unit, lists, counts, full, expected)
    assert_same_scores(expected, lse, got, block_lse(q, k, seq_lens, 0.3, unit, lists, counts, full, got))


@pytest.mark.parametrize("pool_blocks", [2, 5, 40])
def test_pool_attention_matches_the_op_as_the_cache_grows(pool_blocks: int) -> None:
    """Appends, prefetches, evictions and chunked full rows: the pool gives the op's results."""
    gen = torch.Generator().manual_seed(pool_blocks)
    layers, batch, kv_heads, capacity, dim, unit, heads = 2, 2, 2, 512, 16, 16, 8
    lengths = [200, 131]
    k = torch.randn(layers, batch, kv_heads, capacity, dim, generator=gen)
    v = torch.randn(layers, batch, kv_heads, capacity, dim, generator=gen)
    cache = OffloadedKVCache(layers, batch, kv_heads, capacity, dim, unit, torch.float32, "cpu",
                             OffloadConfig(pool_blocks=pool_blocks))
    cache.reserve(99)
    for layer in range(layers):
        for b in range(batch):
            cache.write(layer, b, 0, k[layer, b, :, : lengths[b]], v[layer, b, :, : lengths[b]])
    positions = torch.tensor(lengths)
    rows = torch.arange(batch)
    for step in range(12):
        for layer in range(layers):
            new_k, new_v = (torch.randn(batch, kv_heads, dim, generator=gen) for _ in range(2))
            k[layer, rows, :, positions], v[layer, rows, :, positions] = new_k, new_v
            cache.append(layer, positions, new_k, new_v)
            seq_lens = (positions + 1).to(torch.int32)
            q = torch.randn(batch, heads, dim, generator=gen)
            lists, counts = random_lists(gen, batch, kv_heads, 10, int(seq_lens.max()) // unit + 1)
            full = torch.rand(batch, kv_heads, generator=gen) < 0.2
            if step % 3 == 0:
                cache.prefetch(layer, seq_lens, lists, counts)
            expected, got = torch.empty(batch, heads, capacity // unit), torch.empty(batch, heads, capacity // unit)
            out, lse = sparse_decode_attention(q, k[layer], v[layer], seq_lens, 0.25, unit, lists, counts, full, expected)
            out2, lse2 = cache.attention(layer, q, seq_lens, 0.25, unit, lists, counts, full, got)
            assert torch.allclose(out, out2, atol=1e-5)
            assert_same_scores(expected, lse, got, lse2)
        positions += 1


def test_layer_major_prefill_matches_chunk_major() -> None:
    torch.manual_seed(0)
    llm = LLM("random:tiny-llama", device="cpu", block_size=16, prefill_chunk=128, method="lfps", budget=128)
    on_device = llm._cache_for(1, 768)
    hidden = llm._prefill(PROMPT, 0, on_device)
    llm.cache, llm.kv_offload = None, OffloadConfig()
    offloaded = llm._cache_for(1, 768)
    assert isinstance(offloaded, OffloadedKVCache)
    assert torch.allclose(llm._prefill(PROMPT, 0, offloaded), hidden, atol=1e-6)
    n = len(PROMPT)
    assert torch.allclose(offloaded.k[..., :n, :], on_device.k[..., :n, :], atol=1e-6)
    assert torch.allclose(offloaded.v[..., :n, :], on_device.v[..., :n, :], atol=1e-6)




def on_device_then_offloaded(llm: LLM, config: OffloadConfig, prompt: list[int], new_tokens: int, method: str,
                             **options) -> tuple[tuple, tuple]:
    """The same weights, decoding from an on-device cache and then from an offloaded one."""
    llm.cache, llm.kv_offload = None, None
    llm.use_method(method, **options)
    on_device = generate_recording(llm, prompt, new_tokens)
    llm.cache, llm.kv_offload = None, config
    llm.use_method(method, **options)
    return on_device, generate_recording(llm, prompt, new_tokens)


@pytest.fixture(scope="module")
def tiny() -> LLM:
    torch.manual_seed(0)
    return LLM("random:tiny-llama", device="cpu", block_size=16)


@pytest.mark.parametrize("method,options,config", [
    ("lfps", dict(budget=128), OffloadConfig()),
    ("lfps", dict(budget=128, attend="selected"), OffloadConfig()),  # CPU index over host keys
    ("lfps", dict(budget=128, attend="selected", refresh_threshold=0.9), OffloadConfig(index="gpu", pool_blocks=5)),
    ("lychee+lfps", dict(budget=128, roles="random:3"), OffloadConfig(pool_blocks=7, prefetch=False)),
])
def test_offloaded_decoding_matches_on_device(tiny: LLM, method: str, options: dict, config: OffloadConfig) -> None:
    (tokens, outputs), (tokens2, outputs2) = on_device_then_offloaded(tiny, config, PROMPT, 12, method, **options)
    assert tokens2 == tokens
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outputs, outputs2, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("method,options,pool_blocks", [
    ("lfps", dict(budget=128, attend="selected", refresh_every=4), None),
    # full rows (refreshes) in one pool chunk: streamed in several, they merge in another order
    ("lfps", dict(budget=128, expand=2, refresh_every=4), 64),
    ("lychee+lfps", dict(budget=128, roles="random:3", refresh_every=4), 64),
])
def test_offloaded_decoding_on_cuda_gives_the_on_device_bits(method: str, options: dict, pool_blocks) -> None:
    """On the GPU, with the GPU index: the scores are the on-device op's and the pool lists its blocks
    in the same order, so every attention output is bit-identical (random weights, whose near-ties
    flip on any rounding difference); the on-device run is eager, as offloaded decoding is."""
    torch.manual_seed(0)
    llm = LLM("random:tiny-llama", device="cuda", block_size=16, cuda_graphs=False)
    (tokens, outputs), (tokens2, outputs2) = on_device_then_offloaded(
        llm, OffloadConfig(index="gpu", pool_blocks=pool_blocks), PROMPT, 12, method, **options)
    assert tokens2 == tokens
    assert all(torch.equal(a, b) for a, b in zip(outputs, outputs2, strict=True))


def test_gpu_index_scores_resident_keys_without_moving_blocks(tiny: LLM, monkeypatch) -> None:
    """index="gpu" keeps the keys on the device and only the values in host memory: an exact (full-row)
    index call reads the keys there and gathers nothing into the pool."""
    fetched: list[int] = []
    original_fetch = OffloadedKVCache._fetch
    monkeypatch.setattr(OffloadedKVCache, "_fetch",
                        lambda self, layer, src, dst: (fetched.append(len(src)), original_fetch(self, layer, src, dst)))
    llm = tiny
    llm.cache, llm.kv_offload = None, OffloadConfig(index="gpu", pool_blocks=4)
    llm.use_method("lfps", budget=32, attend="selected", refresh_every=4)
    generate_recording(llm, PROMPT, 6)
    cache = llm.cache
    length = int(cache.lengths[0])
    assert cache.keys_on_device and cache.host_nbytes() == cache.v.numel() * cache.v.element_size()
    fetched.clear()
    q = torch.randn(1, llm.config.num_heads, llm.config.head_dim)
    lens = torch.tensor([length], dtype=torch.int32)
    scores = torch.empty(1, llm.config.num_heads, cache.num_blocks)
    lse = cache.index(0, q, lens, 0.1, cache.block_size, torch.zeros(1, cache.num_kv_heads, 1, dtype=torch.int32),
                      torch.ones(1, cache.num_kv_heads, dtype=torch.int32),
                      torch.ones(1, cache.num_kv_heads, dtype=torch.bool), scores)
    want = torch.empty_like(scores)
    want_lse = block_lse(q, cache.k[0], lens, 0.1, cache.block_size, None, None, None, want)
    assert fetched == [] and torch.allclose(lse, want_lse) and torch.equal(scores.isinf(), want.isinf())
    llm.cache, llm.kv_offload = None, None


def test_offloaded_real_model_gives_the_same_tokens() -> None:
    llm = LLM("smollm2-135m", device="cpu", block_size=16)
    prompt = llm.tokenizer("Alice was beginning to get very tired of sitting by her sister on the bank. " * 8).input_ids
    (tokens, _), (offloaded, _) = on_device_then_offloaded(llm, OffloadConfig(), prompt, 12, "lfps", budget=64,
                                                           refresh_every=4, attend="selected")
    assert offloaded == tokens and len(set(tokens)) > 3


def test_bad_offload_input() -> None:
    with pytest.raises(ValueError, match="kv_offload must be"):
        LLM("random:tiny-llama", device="cpu", kv_offload="disk")
    with pytest.raises(ValueError, match="CUDA device"):
        offload_config("cpu", torch.device("meta"))
    with pytest.raises(ValueError, match="index"):
        OffloadConfig(index="tpu")
    with pytest.raises(ValueError, match="pool_blocks"):
        OffloadConfig(pool_blocks=1)
    with pytest.raises(ValueError, match="cpu_threads"):
        OffloadConfig(cpu_threads=0)
    llm = LLM("random:tiny-llama", device="cpu", method="dense", kv_offload="cpu")
    with pytest.raises(ValueError, match="lfps"):
        llm.generate([PROMPT[:20]], max_new_tokens=2)
    cache = OffloadedKVCache(1, 1, 2, 64, 16, 16, torch.float32, "cpu", OffloadConfig())
    cache.reserve(3)
    with pytest.raises(ValueError, match="whole layer"):
        cache.write(0, 0, 16, torch.zeros(2, 4, 16), torch.zeros(2, 4, 16))
    with pytest.raises(RuntimeError, match="layer by layer"):
        cache.prefix(0, 0, 16)


def test_offload_benchmark_times_warm_steps_and_reports_where_the_cache_lives() -> None:
    from sparsedecode.bench.lfps_bench import fit_table, run_offload
    row = run_offload("random:tiny-llama", 1024, 17, "cpu", dict(budget=128, attend="selected"),
                      OffloadConfig(index="gpu"), "random")
    assert (row["refresh_steps"], row["default_steps"]) == (1, 16)  # steps 0-1 untimed; step 16 refreshes
    assert row["gpu_keys_gib"] == pytest.approx(row["host_kv_gib"]) and row["gpu_keys_gib"] > 0
    one_million = fit_table("llama-3.1-8b", [1 << 20], gpu_bytes=141 * 10**9, host_bytes=125 * 2**30)[0]
    assert one_million["kv_gib"] == 128 and one_million["offload_gpu_index_host_gib"] == 64
    assert not one_million["dense_fits"] and not one_million["offload_fits"]
    assert one_million["offload_gpu_index_fits"]


def test_offload_check_reports_tokens_and_identical_outputs() -> None:
    from sparsedecode.bench.lfps_bench import run_check
    rows = run_check("random:tiny-llama", 1024, 10, "cpu", dict(budget=128, attend="selected", refresh_every=4),
                     OffloadConfig(index="gpu", pool_blocks=6))
    assert [row["passed"] for row in rows] == [True, True, True]
    # on CPU the layer-major prefill may round unlike the chunk-major one (thread splits): not bit-identical
    assert rows[2]["same_tokens"] == 10 and rows[2]["max_rel_err"] < 1e-5
    assert rows[2]["identical_outputs"] == (rows[2]["max_rel_err"] == 0)


def test_cpu_index_runs_on_the_configured_threads(tiny: LLM, monkeypatch) -> None:
    from sparsedecode.offload import cache as offload_cache
    seen: list[int] = []
    original = offload_cache.block_lse
    monkeypatch.setattr(offload_cache, "block_lse", lambda *a: (seen.append(torch.get_num_threads()), original(*a))[1])
    threads = torch.get_num_threads()
    wanted = 3 if threads != 3 else 2
    tiny.cache, tiny.kv_offload = None, OffloadConfig(cpu_threads=wanted)
    tiny.use_method("lfps", budget=64, attend="selected")
    generate_recording(tiny, PROMPT, 3)
    tiny.cache, tiny.kv_offload = None, None
    assert seen and set(seen) == {wanted} and torch.get_num_threads() == threads


def test_generate_command_with_kv_offload_prints_the_on_device_text() -> None:
    from click.testing import CliRunner

    from sparsedecode.cli import main
    text = "Alice was beginning to get very tired of sitting by her sister on the bank. " * 10
    base = ["generate", "--model", "smollm2-135m", "--device", "cpu", "-n", "10", "--method", "lfps",
            "-o", "budget=64", "-o", "attend=selected", "-o", "refresh_every=4",
            "--prompt", f"{text}\nWho was tired, and where was she sitting?"]
    on_device = CliRunner().invoke(main, base)
    offloaded = CliRunner().invoke(main, [*base, "--kv-offload", "cpu-index", "--offload-threads", "1"])
    assert on_device.exit_code == 0 and offloaded.exit_code == 0, offloaded.output
    assert offloaded.stdout == on_device.stdout and len(on_device.stdout.strip()) > 5
    misuse = CliRunner().invoke(main, [*base, "--offload-threads", "2"])
    assert misuse.exit_code == 2 and "needs --kv-offload cpu-index" in misuse.output
    dense = CliRunner().invoke(main, ["generate", "--model", "smollm2-135m", "--device", "cpu", "-n", "2",
                                      "--prompt", "hi", "--kv-offload", "gpu-index"])  # the default method: dense
    assert dense.exit_code != 0 and "works with the methods 'lfps' and 'lychee+lfps'" in str(dense.exception)
