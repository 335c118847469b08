"""The benchmark machinery on CPU: the end-to-end run on the serving engine (a tiny random model, and real
weights), the bytes arithmetic, the transformers baseline model, the LFPS and offload measurements, the
engine check's parity run, the shared helpers and the command line."""
import json
import os
import sys
import time
import types
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from sparsedecode import LLM
from sparsedecode.bench import cli as bench_cli
from sparsedecode.bench import common, e2e, engine_check, lfps_bench
from sparsedecode.core import DecodeBatch, KVPool
from sparsedecode.engine.model_runner import PrefillRequest
from sparsedecode.engine.sampling import sample_tokens
from sparsedecode.kernels.sparse_decode import Launch
from sparsedecode.methods import make_method
from sparsedecode.models.config import model_config_from_hf
from sparsedecode.models.shapes import SHAPES, random_shape_config
from sparsedecode.offload import OffloadConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = model_config_from_hf(random_shape_config("random:tiny-llama"))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; several spin against each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_e2e_tiny_model_writes_table_json_and_plots(tmp_path, one_thread):
    # 24 blocks hold two sequences of 512 + the 43 tokens the run decodes (9 blocks each): `max` is 2
    opts = e2e.E2EOptions(
        models=["random:tiny-llama"], contexts=[512], batches=[1, e2e.MAX_BATCH],
        methods=["sdpa", "lychee", "quest", "lfps", "lychee+lfps", "no-such-method"], budget=64, roles="random:2",
        steps=2, warmup=1, hf_modes=("eager",), hf_context=512, hf_random_shapes=True, device="cpu", num_blocks=24,
    )
    logged = []
    results = e2e.run_e2e(opts, tmp_path, log=logged.append)

    rows = results["rows"]
    methods = ["dense", "sdpa", "lychee", "quest", "lfps", "lychee+lfps"]
    assert [(r["context"], r["batch"], r["method"]) for r in rows] == [(512, b, m) for b in (2, 1) for m in methods]
    assert results["pools"] == [dict(model="random:tiny-llama", context=512, blocks=23, block_size=64,
                                     decode_tokens=43, sequences=2)]
    for r in rows:
        assert r["ms"] > 0 and r["p10_ms"] <= r["p90_ms"] and r["floor_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["ms"] * 1e3)
        assert r["ceiling_fraction"] == pytest.approx(r["speedup"] / r["ceiling"])
        assert sum(v["weight"] for v in r["variants"].values()) == pytest.approx(1.0)
        if r["method"] in ("dense", "sdpa"):
            assert r["ceiling"] == pytest.approx(1.0)
        # sdpa attends to a fixed length: no engine step at growing positions
        assert (r["engine_ms"] is None) == (r["method"] == "sdpa") and (r["engine_ms"] is None) == (r["host_ms"] is None)
    assert all(r["speedup"] == 1.0 for r in rows if r["method"] == "dense")
    # lfps refreshes every 16th step: both kinds of step timed, weighted 1/16 and 15/16
    lfps = next(r for r in rows if r["method"] == "lfps")
    assert {k: v["weight"] for k, v in lfps["variants"].items()} == {"step 0": 1 / 16, "step 1": 15 / 16}
    assert lfps["variants"]["step 0"]["kv_rows"] > lfps["variants"]["step 1"]["kv_rows"]
    assert next(r for r in rows if r["method"] == "lychee")["options"] == "budget=64 roles=random:2"
    assert any("no-such-method" in n for n in results["notes"])

    hf_rows = [r for r in rows if "vs_hf_eager" in r]
    assert {(r["context"], r["batch"]) for r in hf_rows} == {(512, 1)} and len(hf_rows) == len(methods)
    hf = results["hf"][0]  # a difference of two wall-clock times: its sign is noise on a busy CPU
    assert hf["mode"] == "eager" and all(r["vs_hf_eager"] == pytest.approx(hf["ms"] / r["ms"]) for r in hf_rows)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["meta"]["copy_bandwidth"] > 0
    markdown = (tmp_path / "results.md").read_text()
    assert "| model | ctx | B | method | ms/step | p10-p90 ms | engine ms | host ms |" in markdown
    assert "## transformers generate" in markdown and "## KV pool" in markdown
    for png in ("speedup_vs_context.png", "time_vs_floor.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left
    assert any("transformers generate (eager)" in line for line in logged)


def test_e2e_skips_a_batch_the_pool_does_not_hold(one_thread):
    opts = e2e.E2EOptions(models=["random:tiny-llama"], contexts=[512], batches=[3], methods=["dense"], steps=2,
                          warmup=1, hf_modes=(), device="cpu", num_blocks=20)
    results = e2e.run_e2e(opts, log=lambda message: None)
    assert results["rows"] == []
    assert any("batch=3: skipped, the KV pool holds 2 such sequences" in n for n in results["notes"])


def test_e2e_samples_when_asked_and_says_so(monkeypatch, tmp_path, one_thread):
    from sparsedecode.engine import model_runner

    drawn = []

    def counted(logits, temperature, top_p, *args):
        drawn.append((temperature.tolist(), top_p.tolist()))
        return sample_tokens(logits, temperature, top_p, *args)

    monkeypatch.setattr(model_runner, "sample_tokens", counted)
    opts = e2e.E2EOptions(models=["random:tiny-llama"], contexts=[512], batches=[2], methods=["dense"], steps=2,
                          warmup=1, hf_modes=(), device="cpu", num_blocks=20, temperature=0.8, top_p=0.9)
    results = e2e.run_e2e(opts, tmp_path, log=lambda message: None)
    assert [r["batch"] for r in results["rows"]] == [2]
    # every step of the run, the measured ones included, sampled both rows at the options' temperature and top-p
    assert len(drawn) > opts.steps and all(d == (pytest.approx([0.8, 0.8]), pytest.approx([0.9, 0.9])) for d in drawn)
    assert results["meta"]["temperature"] == 0.8
    assert "; sampled at temperature 0.8, top-p 0.9; " in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_e2e_real_weights_prefill_the_haystack(tmp_path, one_thread):
    """A model with a tokenizer: prompts from the haystack text, its trained length as the longest context."""
    haystack = tmp_path / "essay.txt"
    haystack.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    opts = e2e.E2EOptions(models=["smollm2-135m"], contexts=[256, 16384], batches=[1], methods=["quest"], budget=64,
                          steps=2, warmup=1, hf_modes=(), haystack=str(haystack), device="cpu")
    results = e2e.run_e2e(opts, log=lambda message: None)
    assert [(r["context"], r["method"]) for r in results["rows"]] == [(256, "dense"), (256, "quest")]
    assert "smollm2-135m: contexts above its trained 8192 skipped" in results["notes"]
    assert all(r["engine_ms"] > 0 for r in results["rows"])


def test_pool_fit_by_hand(one_thread):
    llm = LLM("random:tiny-llama", device="cpu", max_context=2048, max_num_seqs=4, num_blocks=40)
    # at most 39 // 16 = 2 prompts of 1024: their prefill takes ceil(2048 / 2046) + 2 = 4 steps; then
    # 1 (the prefill's token) + 4 + 2 (START_STEPS) + 36 + 1 (spare) = 44 tokens, 17 blocks a sequence
    assert e2e.pool_fit(llm.engine, 1024, 36) == (44, 2)
    # 4 slots bound the prefill's steps: ceil(800 / 2044) + 4 = 5; 1 + 5 + 2 + 10 + 1 = 19 tokens, 4 blocks
    assert e2e.pool_fit(llm.engine, 200, 10) == (19, 9)


def test_sdpa_attends_like_dense_through_a_block_table():
    pool = KVPool(1, 8, TINY.num_kv_heads, 16, TINY.head_dim, torch.float32, "cpu")
    pool.k.normal_()
    pool.v.normal_()
    tables = torch.tensor([[5, 2, 7], [1, 6, 3]], dtype=torch.int32)  # scattered blocks
    batch = DecodeBatch(tables, torch.tensor([40, 40], dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
    q = torch.randn(2, TINY.num_heads, TINY.head_dim)
    sdpa = e2e.SdpaDense(TINY, length=40).attend(0, q, pool, batch)
    torch.testing.assert_close(sdpa, make_method("dense", TINY).attend(0, q, pool, batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="for benchmarks only"):
        e2e.SdpaDense(TINY)


def test_step_kinds():
    lfps = make_method("lfps", TINY, budget=64)
    kinds = common.step_kinds(lfps, 1025, 64)
    assert kinds[:18] == [0] + [1] * 15 + [0, 1] and Counter(kinds) == {0: 4, 1: 60}
    assert set(common.step_kinds(make_method("dense", TINY), 1025, 64)) == {0}
    lychee = make_method("lychee", TINY, roles="random:2", budget=64, dense_every=4)
    assert common.step_kinds(lychee, 1025, 8) == [0, 0, 0, 3, 0, 0, 0, 3]


def test_prompts_are_distinct():
    random_ids = common.prompts(None, 100, 50, 3)
    assert len({tuple(p) for p in random_ids}) == 3 and all(len(p) == 50 and 0 < min(p) and max(p) < 100
                                                             for p in random_ids)
    assert random_ids == common.prompts(None, 100, 50, 3)  # seeded


def test_prompts_rotate_the_haystack(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("abcdef")
    tokenizer = lambda t, add_special_tokens: types.SimpleNamespace(input_ids=list(t))  # noqa: E731
    assert common.prompts(tokenizer, 0, 8, 2, str(text)) == [list("abcdefab"), list("defabcde")]


def test_derive_by_hand():
    # weights 1000 B; 2 sequences each reading 50 rows of 4 B: 1400 B; dense reads 200 rows: 2600 B
    nbytes = e2e.step_bytes(1000, 50, 4, 2)
    dense_bytes = e2e.step_bytes(1000, 200, 4, 2)
    assert (nbytes, dense_bytes) == (1400, 2600)
    timing = common.Timing(median=2.0, p10=1.9, p90=2.2, mean=2.05, calls=10)
    d = e2e.derive(timing, nbytes, batch=2, dense_seconds=2.6, dense_bytes=dense_bytes, bandwidth=1000.0)
    assert d["floor_ms"] == pytest.approx(1400.0)  # 1400 B / 1000 B/s
    assert d["time_over_floor"] == pytest.approx(2.0 / 1.4)
    assert d["speedup"] == pytest.approx(1.3)
    assert d["ceiling"] == pytest.approx(2600 / 1400)
    assert d["ceiling_fraction"] == pytest.approx(1.3 * 1400 / 2600)
    assert d["tokens_per_s"] == pytest.approx(1.0)
    assert d["gbps"] == pytest.approx(700e-9)
    assert (d["ms"], d["p10_ms"], d["p90_ms"]) == pytest.approx((2000.0, 1900.0, 2200.0))


def test_llama_128k_ceiling_by_hand():
    """The issue's target: Llama-3.1-8B, 128K, batch 1, budget 4096, 32 retrieval units of 256."""
    config = model_config_from_hf(random_shape_config("random:llama-3.1-8b"))
    per_layer = 4096 * (32 + 2 * 8) * 128 + 32 * 128 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    weights = 2 * (32 * per_layer + 128256 * 4096 + 4096)
    assert config.weight_bytes(2) == weights == 15_009_849_344
    seq_len = 131072 + 1  # the decoded token attends to itself
    dense_rows = 32 * 8 * seq_len
    # 32 full units; 224 reading the 4096-token budget: 63 whole blocks and the newest, which holds 1 token
    lychee_rows = 32 * seq_len + (256 - 32) * (63 * 64 + 1)
    lychee = make_method("lychee", config, roles="random:24", budget=4096)
    assert make_method("dense", config).kv_tokens_read(seq_len, 0) == dense_rows
    assert lychee.kv_tokens_read(seq_len, 0) == lychee_rows
    row_bytes = 2 * 128 * 2
    ceiling = e2e.step_bytes(weights, dense_rows, row_bytes, 1) / e2e.step_bytes(weights, lychee_rows, row_bytes, 1)
    assert ceiling == pytest.approx((15_009_849_344 + 17_180_000_256) / (15_009_849_344 + 2_610_036_736))
    assert ceiling == pytest.approx(1.827, abs=1e-3)


TINY_QWEN2_TIED = dict(
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6, max_position_embeddings=4096,
    tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2-tied"])
def test_hf_model_shares_the_engine_weights(monkeypatch, shape, one_thread):
    monkeypatch.setitem(SHAPES, "tiny-qwen2-tied", TINY_QWEN2_TIED)
    llm = LLM(f"random:{shape}", device="cpu", max_context=64, max_num_seqs=1)
    hf = e2e.hf_model_like(llm.model)
    ids = list(range(3, 40))
    ours = llm.engine.runner.prefill([PrefillRequest(ids, 0, [1], wants_logits=True)])[0]  # the engine holds no block
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0, -1].float()
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    q_proj = hf.model.layers[0].self_attn.q_proj.weight
    assert q_proj.data_ptr() == llm.model.layers[0].qkv_proj.weight.data_ptr()  # a view: no copy


def test_recall_is_one_when_every_step_is_exact(one_thread):
    torch.manual_seed(0)  # the random weights: the same whatever ran before in this process
    rows = lfps_bench.run_recall("random:tiny-llama", [512], 6, 64, (16,), (1,), refresh=(1, 3), device="cpu")
    by_r = {r["R"]: r for r in rows}
    assert by_r[1]["block_recall"] == 1.0 and by_r[1]["out_err_candidates"] == 0.0
    assert by_r[1]["block_recall_predicted"] is None and by_r[1]["read_fraction"] == 1.0  # no predicted steps
    assert 0.0 < by_r[3]["block_recall_predicted"] <= 1.0
    assert 0.0 < by_r[3]["candidate_fraction"] < 1.0 and by_r[3]["read_fraction"] < 1.0
    # the exact selection's token recall (its "ceiling": the top blocks by mass, not by top tokens covered, so
    # a predicted selection can cover more top tokens) is what every-step-exact decoding reaches
    assert by_r[1]["token_recall"] == pytest.approx(by_r[1]["token_recall_ceiling"])
    assert all(0.0 < r["token_recall"] <= 1.0 for r in rows)


def test_lfps_check_passes_with_and_without_offload(one_thread):
    options = dict(budget=128, attend="selected", refresh_every=4)
    on_device = lfps_bench.run_check("random:tiny-llama", 512, 6, "cpu", options, None)
    assert [r["passed"] for r in on_device] == [True, True]
    rows = lfps_bench.run_check("random:tiny-llama", 512, 6, "cpu", options, OffloadConfig(index="gpu", pool_blocks=6))
    assert rows[2]["passed"] and rows[2]["same_tokens"] == 6 and rows[2]["identical_outputs"]


def test_offload_run_of_a_prefilled_prompt(one_thread):
    rows, setup = lfps_bench.run_offload("random:tiny-llama", 700, 15, "cpu", dict(budget=128), OffloadConfig(),
                                         "prefill")
    kinds = {r["kind"]: r for r in rows}
    assert (kinds["refresh"]["steps"], kinds["default"]["steps"]) == (1, 14)  # steps 0-1 untimed; 16 refreshes
    assert kinds["refresh"]["step_ms"] > 0 and kinds["default"]["step_ms"] > 0
    assert kinds["default"]["link_mb"] > 0 and 0 <= kinds["default"]["hit_rate"] <= 1
    assert setup["gpu_keys_gib"] == 0 and setup["host_kv_gib"] > 0  # the CPU index: K and V in host memory


def test_parity_of_continuous_batching(one_thread):
    opts = engine_check.ParityOptions(requests=5, min_len=64, max_len=500, min_new_tokens=3, max_new_tokens=10,
                                      arrival_gap=1, max_num_seqs=3, decode_steps=2, sparse_budget=64, device="cpu")
    rows = engine_check.run_parity(opts, log=lambda message: None)
    summary = engine_check.parity_summary(rows)
    assert [s["method"] for s in summary] == ["dense", "lychee, roles all", "lychee+lfps"]
    assert all(s["requests"] == s["same_tokens"] == 5 for s in summary)
    assert all(s["ran_together"] == 3 for s in summary)  # every slot taken, the rest waiting
    assert sorted({r["prompt_tokens"] for r in rows}) == sorted(r["prompt_tokens"] for r in rows[:5])


def test_common_helpers(tmp_path):
    calls = []
    timing = common.median_time(lambda: calls.append(1), repeats=7, warmup=2, device="cpu")
    assert len(calls) == 9 and timing.calls == 7 and timing.p10 <= timing.median <= timing.p90
    order = []
    difference = common.paired_difference(lambda: (order.append("long"), time.sleep(0.004)),
                                          lambda: (order.append("short"), time.sleep(0.001)), repeats=5, warmup=1,
                                          device="cpu")
    assert order == ["long", "short"] * 6 and difference.calls == 5
    assert 0.001 < difference.median < 0.03
    assert common.measure_copy_bandwidth("cpu", nbytes=1 << 20, repeats=3) > 0
    table = common.markdown_table([{"a": 1, "b": 0.012345, "c": None}, {"a": 2, "b": 1234.5, "c": "x"}])
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.0123 |  |", "| 2 | 1234 | x |"]
    target = tmp_path / "sub" / "f.txt"
    common.write_atomic(target, "one")
    common.write_atomic(target, "two")
    assert target.read_text() == "two" and os.listdir(target.parent) == ["f.txt"]
    assert target.stat().st_mode & 0o044  # readable by others per the umask, unlike mkstemp's 0600


def test_parse_tokens():
    assert [bench_cli.parse_tokens(t) for t in ("4096", "4k", "128K", "1m")] == [4096, 4096, 131072, 1 << 20]
    for bad in ("4q", "0", "-4k", "k", "4.5k", ""):
        with pytest.raises(ValueError, match="bad token count"):
            bench_cli.parse_tokens(bad)


@pytest.mark.parametrize("args, message", [
    (["--contexts", "4k,4q"], "bad token count '4q'"),
    (["--contexts", ","], "give at least one context"),
    (["--batches", "1,x"], "positive batch sizes and/or max"),
    (["--batches", "0"], "positive batch sizes and/or max"),
    (["--methods", "dense,foo"], "unknown method(s) foo; known: dense, lfps"),
    (["--models", "random:nope"], "unknown random-weight shape 'random:nope'"),
    (["--models", "no-such-model"], "neither a random-weight shape"),
    (["--hf-modes", "fast"], "one or both of eager, compiled"),
    (["--contexts", "4k", "--hf-context", "32k"], "32768 is not one of the contexts"),
    (["--steps", "1"], "--steps"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--temperature", "2.5"], "--temperature"),
    (["--top-p", "0.9"], "a greedy step (temperature 0) takes no top-p"),
    (["--decode-linear", "cutlass"], "'cutlass' is not one of 'auto', 'torch', 'gemv', 'gemv-fused'"),
])
def test_e2e_cli_rejects_bad_arguments(args, message):
    result = CliRunner().invoke(bench_cli.bench_group, ["e2e", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_e2e_cli_parses_into_options(monkeypatch, tmp_path):
    seen = {}

    def fake_run(opts, out):
        seen.update(opts=opts, out=out)
        return {"meta": {}, "rows": [], "hf": [], "notes": []}

    monkeypatch.setattr(e2e, "run_e2e", fake_run)
    monkeypatch.setattr(e2e, "results_markdown", lambda results: "TABLE")
    result = CliRunner().invoke(bench_cli.bench_group, [
        "e2e", "--models", "random:tiny-llama", "--contexts", "32k,4k,4096", "--batches", "8,max,1",
        "--methods", "lychee,dense,lychee", "--no-hf-baseline", "--gpu-memory-utilization", "0.8",
        "--num-blocks", "100", "--temperature", "1", "--top-p", "0.95", "--decode-linear", "gemv", "--out", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    opts = seen["opts"]
    assert (opts.contexts, opts.batches, opts.hf_modes) == ([4096, 32768], [1, 8, "max"], ())
    assert opts.methods == ["lychee", "dense"]
    assert (opts.gpu_memory_utilization, opts.num_blocks, opts.temperature, opts.top_p) == (0.8, 100, 1.0, 0.95)
    assert opts.decode_linear == "gemv" and seen["out"] == tmp_path and "TABLE" in result.output


def test_kernel_subcommand_calls_the_kernel_benchmark(monkeypatch):
    import sparsedecode.bench

    got = []
    fake = types.ModuleType("sparsedecode.bench.kernel_bench")
    fake.run = lambda contexts, batches, flashinfer, launches: got.append((contexts, batches, flashinfer, launches))
    fake.gemv_rows = lambda: got.append("gemv")
    monkeypatch.setitem(sys.modules, "sparsedecode.bench.kernel_bench", fake)
    monkeypatch.setattr(sparsedecode.bench, "kernel_bench", fake, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = CliRunner().invoke(bench_cli.bench_group, ["kernel", "--contexts", "128k,32k", "--batches", "8",
                                                        "--launch", "num_stages=5,items_per_sm=3", "--launch", "num_warps=8"])
    assert result.exit_code == 0, result.output
    assert got == [((32768, 131072), (8,), None, (Launch(num_stages=5, items_per_sm=3), Launch(num_warps=8)))]
    result = CliRunner().invoke(bench_cli.bench_group, ["kernel", "--contexts", "lots"])
    assert result.exit_code == 2 and "bad token count 'lots'" in result.output
    for bad, says in [("tiles=3", "FIELD one of"), ("num_warps=four", "num_warps is an integer"),
                      ("num_warps", "give FIELD=VALUE"), ("items_per_sm=0", "items_per_sm must be a positive integer"),
                      ("tile_elements=3000", "tile_elements must be a power of 2")]:
        result = CliRunner().invoke(bench_cli.bench_group, ["kernel", "--launch", bad])
        assert result.exit_code == 2 and says in result.output, (bad, result.output)
    assert len(got) == 1
    assert CliRunner().invoke(bench_cli.bench_group, ["kernel", "--gemv"]).exit_code == 0 and got[1:] == ["gemv"]


def test_lfps_subcommands_run_on_the_cpu(tmp_path):
    """The LFPS measurements are `sparsedecode bench` subcommands (no second click group)."""
    result = CliRunner().invoke(bench_cli.bench_group, ["lfps-index", "--tiny", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "lfps_index.json").read_text())
    assert {r["case"] for r in rows} >= {"index exact (all keys)", "index lfps (candidates)"}
    assert "| device | context |" in (tmp_path / "lfps_index.md").read_text()
    result = CliRunner().invoke(bench_cli.bench_group, ["lfps-recall", "--block-sizes", "64,48"])
    assert result.exit_code == 2 and "block sizes are 16, 32, 64 or 128" in result.output


def test_engine_check_cli_builds_both_parts(monkeypatch, tmp_path):
    seen = {}

    def fake_check(timing, parity, out, log):
        seen.update(timing=timing, parity=parity, out=out)
        return False

    monkeypatch.setattr(engine_check, "run_engine_check", fake_check)
    result = CliRunner().invoke(bench_cli.bench_group, ["engine-check", "--min-len", "8k", "--max-len", "32k",
                                                        "--sparse-budget", "256", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "changed the tokens of a request" in result.output
    timing, parity = seen["timing"], seen["parity"]
    assert (timing.models, timing.contexts, timing.batches) == (["random:llama-3.1-8b"], [131072], [1, 2, 4, "max"])
    assert timing.methods == ["dense", "lychee", "lychee+lfps"] and (timing.budget, timing.roles) == (4096, "random:24")
    assert (parity.model, parity.dtype, parity.min_len, parity.max_len) == ("random:tiny-llama", "float32", 8192, 32768)
    assert parity.sparse_budget == 256
    result = CliRunner().invoke(bench_cli.bench_group, ["engine-check", "--no-timing", "--out", str(tmp_path)])
    assert seen["timing"] is None


def test_profiled_kernels_are_listed_under_the_table():
    """A step profiled with --profile gets its own table: the top kernels and the rest summed."""
    meta = dict(device="GPU", torch="2", transformers="5", date="today", copy_bandwidth=3e12, steps=30, warmup=5,
                budget=4096, roles="random:24")
    kernels = {f"kernel_{i}": float(20 - i) for i in range(e2e.PROFILE_TOP + 2)}
    row = dict(model="random:tiny-llama", context=131072, batch=1, method="lychee", p10_ms=1.0, p90_ms=1.2,
               ceiling_fraction=0.8,
               variants={"step 0": dict(weight=1.0, kernels_us=kernels)})
    text = e2e.results_markdown(dict(meta=meta, rows=[row], hf=[], notes=[]))
    assert "## Kernels of one step: random:tiny-llama 128K B1 lychee (the kind of step 0" in text
    assert "| kernel_0 | 20.0 |" in text and "kernel_12" not in text
    assert "| (all others) | 15.0 |" in text  # kernel_12 and kernel_13: 8 + 7


def test_bench_hf_times_plain_and_sparse_generate(tmp_path, one_thread):
    out = tmp_path / "hf"
    result = CliRunner().invoke(bench_cli.bench_group, [
        "hf", "--models", "random:tiny-llama", "--contexts", "256", "--methods", "dense,lychee",
        "--roles", "random:2", "--budget", "64", "--steps", "3", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    by_name = {r["generate"]: r for r in rows}
    assert set(by_name) == {"plain, eager", "sparse_decoding dense", "sparse_decoding lychee"}
    assert all(r["ms/step"] > 0 and r["tok/s"] == pytest.approx(1e3 / r["ms/step"]) for r in rows)
    assert by_name["sparse_decoding dense"]["KV read"] == 1
    # a 64-token budget over a 256-token prompt: lychee's sparse heads read a part of the KV
    assert 0 < by_name["sparse_decoding lychee"]["KV read"] < 1
    assert "| sparse_decoding lychee |" in (out / "results.md").read_text()


def test_bench_hf_profile_lists_each_methods_step(tmp_path, one_thread):
    out = tmp_path / "hf-profile"
    result = CliRunner().invoke(bench_cli.bench_group, [
        "hf", "--profile", "--models", "random:tiny-llama", "--contexts", "256", "--methods", "dense,lychee",
        "--roles", "random:2", "--budget", "64", "--steps", "3", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "lychee"]
    assert all(r["step ms"] > 0 and r["compiles"] == 0 for r in rows)
    # the profiled steps went through the sparse cache: dense reads every row, lychee's sparse heads a part
    assert rows[0]["KV read"] == 1 and 0 < rows[1]["KV read"] < 1
    assert "## lychee" in (out / "results.md").read_text()
    # the Python functions by self time: the package's attention and transformers' model code among them
    for row in rows:
        functions = row["functions"]
        assert [f[1] for f in functions] == sorted((f[1] for f in functions), reverse=True)
        assert all(0 <= own <= inclusive and calls > 0 for _, own, inclusive, calls in functions)
        assert any(f[0].startswith("sparsedecode/kernels/reference.py") for f in functions), functions
        assert any(f[0].startswith("transformers/") for f in functions), functions
        assert not any(f[0].startswith("sparsedecode/bench/") for f in functions)


@pytest.mark.parametrize("args,words", [
    (["--contexts", "8k"], "over its 4096 positions"),
    (["--profile", "--contexts", "8k"], "over its 4096 positions"),
    (["--methods", "sdpa"], "benchmark-only method"),
    (["--roles", "random:24"], "random:N needs"),
    (["--profile", "--roles", "random:24"], "random:N needs"),
    (["--profile", "--contexts", "256,512"], "one model and one context"),
])
def test_bench_hf_bad_input_is_one_error_line(tmp_path, args, words, one_thread):
    result = CliRunner().invoke(bench_cli.bench_group, [
        "hf", "--models", "random:tiny-llama", "--contexts", "256", "--methods", "dense,lychee", "--steps", "2",
        "--device", "cpu", "--out", str(tmp_path), *args])
    assert result.exit_code != 0 and words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "results.json").exists()  # nothing half-written


@pytest.mark.parametrize("roles,real,expected", [
    (None, False, "random:24"),   # random weights: no learned roles exist
    (None, True, None),           # real weights: the method's default, the model's learned roles
    ("learned:6", True, "learned:6"),
    ("random:8", False, "random:8"),
])
def test_bench_roles_reach_lychee_on_random_and_real_models(roles, real, expected):
    options = e2e.method_options("lychee", 1024, roles, real)
    assert options.get("roles") == expected and options["budget"] == 1024
    assert "roles" not in e2e.method_options("tidal", 1024, roles, real)  # tidal's roles define it
    assert e2e.method_options("dense", 1024, roles, real) == {}
