"""KV offload on the paged engine, on CPU (host and device one memory) and, where there is one, on the GPU:
the CPU index against the op, the staging pool against the on-device pool under eviction, layer-major
prefill against chunked prefill, offloaded decoding (one request, and requests joining a running batch)
against on-device decoding, the command line, bad input, and how the pool is sized beside its staging pool."""
from __future__ import annotations

import pytest
import torch

from sparsedecode import LLM, SamplingParams
from sparsedecode.core import DecodeBatch, KVPool
from sparsedecode.kernels import sparse_decode_attention
from sparsedecode.methods import make_method
from sparsedecode.offload import (OffloadConfig, OffloadedKVPool, offload_config, offload_pool_blocks,
                                  offload_staging_bytes)
from sparsedecode.offload import cache as offload_cache
from sparsedecode.offload.staging import staging_pool_bytes
from sparsedecode.offload.scoring import block_lse
from recording import generate_recording

PROMPT = [(7 * i) % 500 + 1 for i in range(700)]
TINY = dict(device="cpu", block_size=16, max_context=1024, max_num_seqs=4, enable_prefix_caching=False)


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


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("rows", ["lists", "mixed", "dense"])
def test_block_lse_matches_the_op(rows: str, paged: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, capacity, dim, unit = 2, 8, 2, 256, 16, 16
    q, k = torch.randn(batch, heads, dim, generator=gen), torch.randn(batch, kv_heads, capacity, dim, generator=gen)
    tables = None
    if paged:  # the same keys as a pool of blocks in shuffled order
        order = torch.randperm(batch * capacity // unit, generator=gen)
        k = k.unflatten(2, (-1, unit)).transpose(1, 2).flatten(0, 1)[order.argsort()]
        tables = order.view(batch, -1).to(torch.int32)
    seq_lens = torch.tensor([200, 37], dtype=torch.int32)
    lists, counts = random_lists(gen, batch, kv_heads, 9, capacity // unit)
    lists, counts = (None, None) if rows == "dense" else (lists, counts)
    full = torch.tensor([[True, False], [False, False]]) if rows == "mixed" else None
    expected, got = torch.empty(batch, heads, capacity // unit), torch.empty(batch, heads, capacity // unit)
    _, lse = sparse_decode_attention(q, k, k, seq_lens, 0.3, unit, lists, counts, full, expected, block_tables=tables)
    got_lse = block_lse(q, k, seq_lens, 0.3, unit, lists, counts, full, got, block_tables=tables)
    assert_same_scores(expected, lse, got, got_lse)


@pytest.mark.parametrize("index", ["cpu", "gpu"])
@pytest.mark.parametrize("pool_blocks", [2, 3, 6])
def test_staged_pool_matches_the_device_pool_under_eviction(pool_blocks: int, index: str) -> None:
    """Random lists (most longer than the staging pool: read in place from host memory), full rows,
    prefetches of other lists before the layer's store, a row turning idle and a new sequence reusing the
    freed blocks with new K/V: every attention and index call over the offloaded pool gives the device
    pool's results, so no call read a block evicted or overwritten while it still needed it (issue 25;
    tests/test_offload_stress.py presses the staging itself)."""
    gen = torch.Generator().manual_seed(pool_blocks)
    layers, num_blocks, kv_heads, bs, dim, heads, max_blocks = 2, 48, 2, 16, 16, 8, 12
    shape = (layers, num_blocks, kv_heads, bs, dim, torch.float32, "cpu")
    device_pool = KVPool(*shape)
    pool = OffloadedKVPool(*shape, config=OffloadConfig(index=index, pool_blocks=pool_blocks))
    pool.reserve(99)
    free = torch.randperm(num_blocks - 1, generator=gen).add(1).tolist()  # block 0 is the null block
    tables = torch.zeros(4, max_blocks, dtype=torch.int32)  # row 3 stays idle: null block, length 1
    lengths = [95, 31, 150, 0]

    def prefill(row: int) -> None:
        tables[row] = torch.tensor([free.pop() for _ in range(max_blocks)], dtype=torch.int32)
        positions = torch.arange(lengths[row])
        ids, offsets = tables[row].long()[positions // bs], positions % bs
        for layer in range(layers):
            k, v = (torch.randn(lengths[row], kv_heads, dim, generator=gen) for _ in range(2))
            for p in (device_pool, pool):
                p.store(layer, ids, offsets, k, v)

    for row in range(3):
        prefill(row)
    for step in range(14):
        if step == 7:  # row 1's sequence ends; a new one takes the row and the freed blocks in another order
            free.extend(tables[1].tolist())  # popped from the end: the old blocks, last first
            lengths[1] = 40
            prefill(1)
        positions = torch.tensor(lengths)
        batch = DecodeBatch(tables, (positions + 1).to(torch.int32), torch.zeros(4, dtype=torch.int32))
        store_ids, offsets = tables.long().gather(1, (positions // bs)[:, None]).squeeze(1), positions % bs
        for layer in range(layers):
            k, v = (torch.randn(4, kv_heads, dim, generator=gen) for _ in range(2))
            for p in (device_pool, pool):
                p.store(layer, store_ids, offsets, k, v)
            q = torch.randn(4, heads, dim, generator=gen)
            lists, counts = random_lists(gen, 4, kv_heads, 10, max_blocks)
            full = torch.rand(4, kv_heads, generator=gen) < 0.2
            want_scores, scores = torch.empty(4, heads, max_blocks), torch.empty(4, heads, max_blocks)
            out, lse = device_pool.attention(layer, q, batch, 0.25, bs, lists, counts, full, want_scores)
            got_out, got_lse = pool.attention(layer, q, batch, 0.25, bs, lists, counts, full, scores)
            assert torch.allclose(out, got_out, atol=1e-5)
            assert_same_scores(want_scores, lse, scores, got_lse)
            lse = device_pool.index(layer, q, batch, 0.25, bs, lists, counts, full, want_scores)
            got_lse = pool.index(layer, q, batch, 0.25, bs, lists, counts, full, scores)
            if index == "gpu":  # the device pool's op over the same keys: the same bits
                assert torch.equal(lse, got_lse) and torch.equal(want_scores, scores)
            assert_same_scores(want_scores, lse, scores, got_lse)
            if layer + 1 < layers and step % 2 == 0:  # before the next layer stores this step's token
                pool.prefetch(layer + 1, batch, *random_lists(gen, 4, kv_heads, 10, max_blocks))
        lengths = [n + 1 for n in lengths[:3]] + [0]
    assert pool.host_nbytes() == (1 if index == "gpu" else 2) * pool.v.numel() * 4


def test_layer_major_prefill_matches_chunked_prefill() -> None:
    """`prefill_layer_major` stores the K/V and returns the logits of the engine's chunked prefill."""
    torch.manual_seed(0)
    llm = LLM("random:tiny-llama", prefill_chunk=128, method="lfps", budget=128, **TINY)
    engine, pool = llm.engine, llm.engine.runner.pool
    seq = engine.sequences[engine.add_request(PROMPT, SamplingParams(max_tokens=2))]
    while not seq.output_token_ids:
        engine.step()
    table = seq.block_table[: -(-len(PROMPT) // 16)]
    other = [b for b in range(1, pool.num_blocks) if b not in seq.block_table][: len(table)]
    logits = engine.runner.prefill_layer_major(PROMPT, other)
    assert int(logits.argmax()) == seq.output_token_ids[0]
    tokens = torch.arange(len(PROMPT))
    for part in (pool.k, pool.v):
        chunked, layer_major = part[:, table], part[:, other]
        chunked, layer_major = (x.transpose(1, 2).flatten(2, 3)[:, :, tokens] for x in (chunked, layer_major))
        assert torch.allclose(chunked, layer_major, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_on_device() -> LLM:
    torch.manual_seed(0)
    return LLM("random:tiny-llama", **TINY)


_offloaded: dict[OffloadConfig, LLM] = {}


def tiny_offloaded(config: OffloadConfig) -> LLM:
    """The on-device fixture's weights (the same seed), decoding from an offloaded pool."""
    if config not in _offloaded:
        torch.manual_seed(0)
        _offloaded[config] = LLM("random:tiny-llama", method="lfps", kv_offload=config, **TINY)
    return _offloaded[config]


@pytest.mark.parametrize("method,options,config", [
    ("lfps", dict(budget=128, attend="selected"), OffloadConfig()),  # CPU index over host keys
    ("lfps", dict(budget=128, attend="selected", refresh_threshold=0.9), OffloadConfig(index="gpu", pool_blocks=5)),
    ("lfps", dict(budget=128), OffloadConfig()),  # candidates: refreshes stream through the pool
    ("lychee+lfps", dict(budget=128, roles="random:3"), OffloadConfig(pool_blocks=7, prefetch=False)),
    ("lychee+lfps", dict(budget=128, roles="random:3"), OffloadConfig(index="gpu")),
])
def test_offloaded_decoding_matches_on_device(tiny_on_device: LLM, method: str, options: dict,
                                              config: OffloadConfig) -> None:
    offloaded = tiny_offloaded(config)
    runs = []
    for llm in (tiny_on_device, offloaded):
        llm.use_method(method, **options)
        runs.append(generate_recording(llm, PROMPT, 12))
    (tokens, outputs), (tokens2, outputs2) = runs
    assert tokens2 == tokens
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outputs, outputs2, strict=True))
    assert not offloaded.cuda_graphs and offloaded.engine.runner.pool.layer_major_prefill


def run_arrivals(llm: LLM, arrivals: dict[int, list[tuple[list[int], int]]]) -> list[list[int]]:
    """Requests added to `llm.engine` at the given engine steps (prompt, max_tokens); their tokens, in order
    of arrival."""
    engine, ids, tokens, step = llm.engine, [], {}, 0
    pending = {step: list(requests) for step, requests in arrivals.items()}
    while pending or engine.has_unfinished_requests():
        for prompt, max_tokens in pending.pop(step, []):
            ids.append(engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
        for output in engine.step():
            tokens[output.request_id] = output.token_ids
        step += 1
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("index", ["cpu", "gpu"])
def test_requests_joining_an_offloaded_batch_decode_as_on_device(tiny_on_device: LLM, index: str) -> None:
    """Three requests of different lengths added at different steps to two decode slots: the third
    waits for a slot and for blocks, then reuses both; every request gets its on-device tokens."""
    arrivals = {0: [(PROMPT[:300], 8)], 3: [(PROMPT[100:300], 10), (PROMPT[::3][:150], 6)]}
    options = dict(budget=64, attend="selected", refresh_every=4)
    torch.manual_seed(0)
    small = dict(TINY, max_num_seqs=2, num_blocks=34)  # 33 usable blocks: not enough for all three at once
    offloaded = LLM("random:tiny-llama", method="lfps", kv_offload=OffloadConfig(index=index, pool_blocks=4),
                    **small, **options)
    tiny_on_device.use_method("lfps", **options)
    expected = run_arrivals(tiny_on_device, arrivals)
    assert run_arrivals(offloaded, arrivals) == expected
    assert [len(t) for t in expected] == [8, 10, 6]


SMOLLM = dict(device="cpu", block_size=16, max_context=512, max_num_seqs=2, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def smollm() -> LLM:
    return LLM("smollm2-135m", **SMOLLM)


@pytest.mark.slow
@pytest.mark.parametrize("index", ["cpu", "gpu"])
def test_offloaded_real_model_gives_the_on_device_tokens(smollm: LLM, index: str) -> None:
    """smollm2-135m real weights: two requests, the second joining while the first decodes (lfps selected,
    which scores with the index); with the GPU index also lfps candidates and lychee+lfps, one request."""
    text = "Alice was beginning to get very tired of sitting by her sister on the bank. "
    prompt = smollm.tokenizer(text * 6).input_ids
    arrivals = {0: [(prompt, 6)], 2: [(smollm.tokenizer(text * 3 + "She").input_ids, 5)]}
    options = dict(budget=32, attend="selected", refresh_every=4)
    offloaded = LLM("smollm2-135m", method="lfps", kv_offload=OffloadConfig(index=index), **SMOLLM, **options)
    smollm.use_method("lfps", **options)
    expected = run_arrivals(smollm, arrivals)
    assert run_arrivals(offloaded, arrivals) == expected and len(set(expected[0])) > 2
    if index == "cpu":
        return
    for method, method_options in (("lfps", dict(budget=32)), ("lychee+lfps", dict(budget=32, roles="random:4"))):
        results = []
        for llm in (smollm, offloaded):
            llm.use_method(method, **method_options)
            results.append(llm.generate([prompt], max_new_tokens=4)[0].token_ids)
        assert results[0] == results[1]


def test_bad_offload_input() -> None:
    with pytest.raises(ValueError, match="kv_offload must be"):
        LLM("random:tiny-llama", device="cpu", method="lfps", kv_offload="disk")
    with pytest.raises(ValueError, match="CUDA device"):
        offload_config("cpu", torch.device("meta"))
    with pytest.raises(ValueError, match="index"):
        OffloadConfig(index="tpu")
    with pytest.raises(ValueError, match="pool_blocks"):
        OffloadConfig(pool_blocks=1)
    for threads in (0, 1.5):
        with pytest.raises(ValueError, match="cpu_threads"):
            OffloadConfig(cpu_threads=threads)
    with pytest.raises(ValueError, match="works with the methods 'lfps' and 'lychee\\+lfps'"):
        LLM("random:tiny-llama", device="cpu", method="dense", kv_offload="cpu")
    llm = LLM("random:tiny-llama", method="lfps", kv_offload="cpu", **TINY)
    with pytest.raises(ValueError, match="'quest' cannot decode from an offloaded KV cache"):
        llm.use_method("quest")
    llm.use_method("lfps", block_size=32, attend="selected")
    with pytest.raises(ValueError, match="give the method block_size=16"):
        llm.generate([PROMPT[:40]], max_new_tokens=2)
    with pytest.raises(RuntimeError, match="layer by layer"):
        llm.engine.runner.pool.prefill_attention(0, torch.zeros(1, 4, 16), torch.tensor([1]), 4)


def test_cpu_index_runs_on_the_configured_threads(monkeypatch) -> None:
    from sparsedecode.offload import cache as offload_cache
    seen: list[int] = []
    original = offload_cache.block_lse
    monkeypatch.setattr(offload_cache, "block_lse",
                        lambda *a, **kw: (seen.append(torch.get_num_threads()), original(*a, **kw))[1])
    threads = torch.get_num_threads()
    wanted = 3 if threads != 3 else 2
    llm = tiny_offloaded(OffloadConfig(cpu_threads=wanted))
    llm.use_method("lfps", budget=64, attend="selected")
    llm.generate([PROMPT[:200]], max_new_tokens=3)
    assert seen and set(seen) == {wanted} and torch.get_num_threads() == threads


@pytest.mark.parametrize("method,options,pool_blocks", [
    ("lfps", dict(budget=128, attend="selected"), None),  # slots: as many as the method's candidate lists
    ("lychee+lfps", dict(budget=128, roles="random:3"), None),
    ("lfps", dict(budget=128), 5),
])
def test_staging_bytes_are_what_the_pool_allocates(method: str, options: dict, pool_blocks: int | None) -> None:
    """The estimate the engine sizes the keys with, against the tensors of the staging pool an engine
    builds for its rows (every one the pool allocates per row, and the ticks)."""
    config = OffloadConfig(index="gpu", pool_blocks=pool_blocks)
    llm = LLM("random:tiny-llama", method=method, kv_offload=config, **TINY, **options)
    pool, rows = llm.engine.runner.pool, TINY["max_num_seqs"]
    pool.reserve_rows(rows)
    allocated = sum(t.numel() * t.element_size()
                    for t in (pool.k_staged, pool.v_staged, pool.held, pool.held_writes, pool.last_use, pool.ticks))
    c, max_blocks = llm.config, TINY["max_context"] // TINY["block_size"]
    estimate = offload_staging_bytes(config, make_method(method, c, block_size=TINY["block_size"], **options), rows,
                                     max_blocks, c.num_layers, c.num_kv_heads, TINY["block_size"], c.head_dim,
                                     llm.dtype, llm.device)
    assert estimate == allocated == pool.staging_nbytes()
    assert pool_blocks is None or pool.pool_blocks == pool_blocks


GiB = 2**30
EIGHT_B = dict(num_layers=32, num_kv_heads=8, block_size=64, head_dim=128, dtype=torch.bfloat16)  # Llama-3.1-8B


def sized_blocks(monkeypatch, allocatable: float, usable: float, staging: int, host: float = 1024 * GiB,
                 wanted: int = 10**6, utilization: float = 0.9, index: str = "gpu") -> int:
    """`offload_pool_blocks` of the 8B shape on a GPU where new allocations can take `allocatable` bytes and
    PyTorch `usable` in all, beside a host with `host` bytes available."""
    monkeypatch.setattr(offload_cache, "free_gpu_bytes", lambda device: (int(allocatable), int(usable)))
    monkeypatch.setattr(offload_cache, "available_host_bytes", lambda: int(host))
    s = EIGHT_B
    block_bytes = KVPool.bytes_per_block(s["num_layers"], s["num_kv_heads"], s["block_size"], s["head_dim"], s["dtype"])
    return offload_pool_blocks(OffloadConfig(index=index, pool_blocks=96), wanted, block_bytes,
                               torch.device("cuda"), utilization, staging)


def test_offloaded_keys_get_what_the_staging_pools_leave(monkeypatch) -> None:
    s = EIGHT_B
    key_bytes = s["num_layers"] * s["num_kv_heads"] * s["block_size"] * s["head_dim"] * 2  # one block's keys
    staging = staging_pool_bytes(s["num_layers"], 12, s["num_kv_heads"], 96, s["block_size"], s["head_dim"], s["dtype"])
    # K and V of 96 slots per (layer, row, KV head), and their bookkeeping
    assert staging == 12 * 32 * 8 * 96 * (64 * 128 * 2 * 2 + 3 * 8) + 32 * 8
    free = 120 * GiB
    assert sized_blocks(monkeypatch, free, free, staging) == (int(free * 0.9) - staging) // key_bytes
    assert sized_blocks(monkeypatch, free, free, 0) == int(free * 0.9) // key_bytes
    # the host holds the values of fewer blocks: those; the wanted blocks, when fewer
    assert sized_blocks(monkeypatch, free, free, staging, host=50 * GiB) == int(50 * GiB * 0.9) // key_bytes
    assert sized_blocks(monkeypatch, free, free, staging, wanted=1000) == 1000
    # PyTorch's cache beyond what new allocations can take serves activations, never the keys or staging
    assert sized_blocks(monkeypatch, 100 * GiB, 130 * GiB, staging) == (100 * GiB - staging) // key_bytes
    # the CPU index keeps the keys in host memory: the GPU does not bound the pool
    assert sized_blocks(monkeypatch, 0, 0, staging, host=200 * GiB, index="cpu") == int(200 * GiB * 0.9) // (2 * key_bytes)


def test_twelve_sequences_of_128k_fit_beside_their_staging(monkeypatch) -> None:
    """The 8B shape at 128K (2049 blocks a sequence), 12 rows of 96 staging slots, at the engine's
    gpu_memory_utilization of 0.9. The rule it replaces gave the keys a fixed 0.8 of the free memory."""
    per_sequence = -(-(128 * 1024 + 36) // 64)
    key_bytes = 32 * 8 * 64 * 128 * 2
    staging = staging_pool_bytes(32, 12, 8, 96, 64, 128, torch.bfloat16)

    def sequences(blocks: int) -> int:
        return (blocks - 1) // per_sequence

    # a 150 GB GPU with 16 GB of weights
    free = 150e9 - 16e9
    assert sequences(sized_blocks(monkeypatch, free, free, staging)) >= 12
    # 140 GiB, 15 GiB of weights made in float32 and converted in place, which leaves their other 15 GiB
    # in PyTorch's cache, and 1.5 GiB outside PyTorch: the old rule held 10
    allocatable, usable = 140 * GiB - 15 * GiB - 15 * GiB - 1.5 * GiB, 140 * GiB - 15 * GiB - 1.5 * GiB
    assert sequences(int(allocatable * 0.8) // key_bytes) == 10
    assert sequences(sized_blocks(monkeypatch, allocatable, usable, staging)) == 12


def test_no_room_for_the_offloaded_keys_says_what_to_change(monkeypatch) -> None:
    staging = staging_pool_bytes(32, 12, 8, 96, 64, 128, torch.bfloat16)
    with pytest.raises(RuntimeError, match="lower max_num_seqs or OffloadConfig.pool_blocks"):
        sized_blocks(monkeypatch, 8 * GiB, 8 * GiB, staging)  # the staging pools alone take 9 GiB
    with pytest.raises(RuntimeError, match="host memory"):
        sized_blocks(monkeypatch, 100 * GiB, 100 * GiB, staging, host=2**20)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        sized_blocks(monkeypatch, 100 * GiB, 100 * GiB, staging, utilization=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_engine_sizes_the_offloaded_keys_beside_the_staging_pools_on_cuda(monkeypatch) -> None:
    """An offloaded engine on a GPU whose free memory holds the staging pools of its rows and 100 blocks of
    keys: its pool has those 100 blocks, and the staging pool it then allocates is the one it reserved."""
    config, options = OffloadConfig(index="gpu"), dict(budget=128, attend="selected")
    engine = dict(TINY, device="cuda")
    probe = LLM("random:tiny-llama", method="lfps", kv_offload=config, num_blocks=300, **engine, **options)
    probe.engine.runner.pool.reserve_rows(engine["max_num_seqs"])
    staging = probe.engine.runner.pool.staging_nbytes()
    key_bytes = probe.engine.runner.pool.nbytes() // 2 // 300
    free = staging + 100 * key_bytes
    monkeypatch.setattr(offload_cache, "free_gpu_bytes", lambda device: (free, int(free / 0.9) + 1))
    llm = LLM("random:tiny-llama", method="lfps", kv_offload=config, **engine, **options)
    pool = llm.engine.runner.pool
    assert pool.num_blocks == 100
    pool.reserve_rows(engine["max_num_seqs"])
    assert pool.staging_nbytes() == staging


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("method,options,pool_blocks", [
    ("lfps", dict(budget=128, attend="selected", refresh_every=4), None),
    # full rows (refreshes) in one staging chunk: streamed in several, they merge in another order
    ("lfps", dict(budget=128, expand=2, refresh_every=4), 64),
    ("lychee+lfps", dict(budget=128, roles="random:3", refresh_every=4), 64),
])
def test_offloaded_decoding_on_cuda_gives_the_on_device_bits(method: str, options: dict, pool_blocks) -> None:
    """On the GPU, with the GPU index: the scores are the on-device op's and the staging pool lists its
    blocks in the same order, so every attention output is bit-identical (random weights, whose near-ties
    flip on any rounding difference); both runs eager, to record the outputs. A second request joins the
    first while it decodes, and gets its on-device tokens too. Then the offloaded steps captured in CUDA
    graphs (values in mapped host memory, moved by the gather kernel): the same tokens again."""
    arrivals = {0: [(PROMPT, 8)], 2: [(PROMPT[:300], 8)]}
    runs, llms = [], []
    for offload in (None, OffloadConfig(index="gpu", pool_blocks=pool_blocks)):
        torch.manual_seed(0)
        llm = LLM("random:tiny-llama", device="cuda", block_size=16, max_context=1024, max_num_seqs=2,
                  cuda_graphs=False, enable_prefix_caching=False, method=method, kv_offload=offload, **options)
        runs.append((*generate_recording(llm, PROMPT, 12), run_arrivals(llm, arrivals)))
        llms.append(llm)
    (tokens, outputs, batch), (tokens2, outputs2, batch2) = runs
    assert tokens2 == tokens and batch2 == batch
    assert all(torch.equal(a, b) for a, b in zip(outputs, outputs2, strict=True))
    offloaded = llms[1]
    offloaded.use_method(method, **options)  # a fresh method, without the recording
    offloaded.cuda_graphs = True
    assert offloaded.cuda_graphs
    assert offloaded.generate([PROMPT], max_new_tokens=12, stop_token_ids=[])[0].token_ids == tokens
    assert run_arrivals(offloaded, arrivals) == batch
    assert offloaded.engine.runner.graphs and offloaded.engine.runner.pool.transfer_counts().listed > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_only_the_cpu_index_keeps_offloaded_cuda_decoding_eager() -> None:
    for index, graphs in (("gpu", True), ("cpu", False)):
        llm = LLM("random:tiny-llama", device="cuda", block_size=16, max_context=256, max_num_seqs=1,
                  method="lfps", kv_offload=OffloadConfig(index=index))
        assert llm.cuda_graphs == graphs


@pytest.mark.slow
def test_generate_command_with_kv_offload_prints_the_on_device_text() -> None:
    from click.testing import CliRunner

    from sparsedecode.cli import main
    text = "Alice was beginning to get very tired of sitting by her sister on the bank. " * 4
    base = ["generate", "--model", "smollm2-135m", "--device", "cpu", "-n", "6", "--method", "lfps",
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
