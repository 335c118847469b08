"""The benchmark machinery on CPU: the end-to-end run on a tiny random model, the bytes arithmetic,
the transformers baseline model, the shared helpers and the command line."""
import json
import os
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from sparsedecode import LLM
from sparsedecode.bench import cli as bench_cli
from sparsedecode.bench import common, e2e
from sparsedecode.engine.kv_cache import KVCache
from sparsedecode.methods.base import make_method
from sparsedecode.models.config import model_config_from_hf
from sparsedecode.models.shapes import SHAPES, random_shape_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; several spin against each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_e2e_tiny_model_writes_table_json_and_plots(tmp_path, one_thread):
    opts = e2e.E2EOptions(
        models=["random:tiny-llama"], contexts=[128, 256], batches=[1, 2],
        methods=["sdpa", "lychee", "quest", "lfps", "lychee+lfps", "no-such-method"], budget=64, roles="random:2",
        steps=2, warmup=1, hf_modes=("eager",), hf_context=128, hf_random_shapes=True, device="cpu",
    )
    logged = []
    results = e2e.run_e2e(opts, tmp_path, log=logged.append)

    rows = results["rows"]
    methods = ["dense", "sdpa", "lychee", "quest", "lfps", "lychee+lfps"]
    assert [(r["context"], r["batch"], r["method"]) for r in rows] == [
        (c, b, m) for c in (128, 256) for b in (1, 2) for m in methods
    ]
    for r in rows:
        assert r["ms"] > 0 and r["p10_ms"] <= r["p90_ms"] and r["floor_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["ms"] * 1e3)
        assert r["ceiling_fraction"] == pytest.approx(r["speedup"] / r["ceiling"])
        assert sum(v["weight"] for v in r["variants"].values()) == pytest.approx(1.0)
        if r["method"] in ("dense", "sdpa"):
            assert r["ceiling"] == pytest.approx(1.0)
    assert all(r["speedup"] == 1.0 for r in rows if r["method"] == "dense")
    # lfps refreshes every 16th step: both kinds of step timed, weighted 1/16 and 15/16
    lfps = next(r for r in rows if r["method"] == "lfps")
    assert lfps["variants"]["refresh"]["weight"] == pytest.approx(1 / 16)
    assert next(r for r in rows if r["method"] == "lychee")["options"] == "budget=64 roles=random:2"
    assert any("no-such-method" in n for n in results["notes"])

    hf_rows = [r for r in rows if "vs_hf_eager" in r]
    assert {(r["context"], r["batch"]) for r in hf_rows} == {(128, 1)} and len(hf_rows) == len(methods)
    assert results["hf"][0]["mode"] == "eager" and results["hf"][0]["ms"] > 0

    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["meta"]["copy_bandwidth"] > 0
    markdown = (tmp_path / "results.md").read_text()
    assert "| model | ctx | B | method | ms/step |" in markdown and "## transformers generate" in markdown
    for png in ("speedup_vs_context.png", "time_vs_floor.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left
    assert any("transformers generate (eager)" in line for line in logged)


def test_e2e_real_weight_path_prefills_the_haystack(tmp_path, monkeypatch, one_thread):
    """A model with a tokenizer takes the real-weight path: a real prefill of the haystack prompt, its
    trained length as the longest context, and the prompt for the transformers baseline."""
    haystack = tmp_path / "essay.txt"
    haystack.write_text("The quick brown fox jumps over the lazy dog. " * 10)

    def tiny_with_tokenizer(spec, method, device, **engine_options):
        llm = LLM("random:tiny-llama", method=method, device=device, **engine_options)
        llm.tokenizer = lambda text, add_special_tokens: types.SimpleNamespace(input_ids=[ord(c) for c in text])
        return llm

    monkeypatch.setattr(e2e, "LLM", tiny_with_tokenizer)
    opts = e2e.E2EOptions(models=["real-tiny"], contexts=[128, 8192], batches=[1], methods=["quest"], budget=64,
                          steps=2, warmup=1, hf_modes=("eager",), hf_context=128, haystack=str(haystack),
                          device="cpu")
    results = e2e.run_e2e(opts, log=lambda message: None)
    assert [(r["context"], r["method"]) for r in results["rows"]] == [(128, "dense"), (128, "quest")]
    assert "real-tiny: contexts above its trained 4096 skipped" in results["notes"]
    assert all(r["vs_hf_eager"] > 0 for r in results["rows"])


def test_fill_cache(one_thread):
    llm = LLM("random:tiny-llama", device="cpu")
    cache = llm._cache_for(3, 256)
    prompt = list(range(1, 200))
    tokens = e2e._fill_cache(llm, cache, 150, prompt)
    assert torch.equal(cache.k[:, 2], cache.k[:, 0]) and torch.equal(cache.v[:, 1], cache.v[:, 0])
    assert cache.k[:, 0, :, :150].abs().amin(dim=-1).gt(0).all() and not cache.k[:, 0, :, 150:].any()
    assert tokens.tolist() == llm.generate([prompt[:150]], max_new_tokens=1)[0].token_ids * 3

    cache = llm._cache_for(2, 256)
    tokens = e2e._fill_cache(llm, cache, 150, None)  # random-weight shapes: random values, no prefill
    assert cache.k.ne(0).float().mean() > 0.99 and tokens.shape == (2,)


def test_prompt_ids_repeat_a_short_text(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("abc")
    llm = types.SimpleNamespace(tokenizer=lambda t, add_special_tokens: types.SimpleNamespace(input_ids=list(t)))
    assert e2e._prompt_ids(llm, 7, str(text)) == list("abcabca")


def test_method_options():
    opts = e2e.E2EOptions(models=[], contexts=[], batches=[], methods=[], budget=1024, roles="random:24")
    assert e2e._options_for("lychee", opts, real=False) == {"budget": 1024, "roles": "random:24"}
    assert e2e._options_for("lychee", opts, real=True) == {"budget": 1024}  # its own (learned) roles
    assert e2e._options_for("tidal", opts, real=False) == {"budget": 1024}  # tidal's roles define it
    assert e2e._options_for("lychee+lfps", opts, real=False)["roles"] == "random:24"
    assert e2e._options_for("dense", opts, real=False) == {}


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
    lychee_rows = 32 * seq_len + (256 - 32) * 4096  # 32 full units, 224 reading the 4096-token budget
    lychee = make_method("lychee", config, roles="random:24", budget=4096)
    assert make_method("dense", config).kv_tokens_read(seq_len, "default") == dense_rows
    assert lychee.kv_tokens_read(seq_len, "default") == lychee_rows
    row_bytes = 2 * 128 * 2
    ceiling = e2e.step_bytes(weights, dense_rows, row_bytes, 1) / e2e.step_bytes(weights, lychee_rows, row_bytes, 1)
    assert ceiling == pytest.approx((15_009_849_344 + 17_180_000_256) / (15_009_849_344 + 2_617_262_080))
    assert ceiling == pytest.approx(1.826, abs=1e-3)


TINY_QWEN2_TIED = dict(
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6, max_position_embeddings=4096,
    tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2-tied"])
def test_hf_model_shares_the_engine_weights(monkeypatch, shape, one_thread):
    monkeypatch.setitem(SHAPES, "tiny-qwen2-tied", TINY_QWEN2_TIED)
    llm = LLM(f"random:{shape}", device="cpu")
    hf = e2e.hf_model_like(llm)
    ids = list(range(3, 40))
    cache = llm._cache_for(1, KVCache.capacity_for(len(ids), 128))
    with torch.inference_mode():
        ours = llm.model.logits(llm._prefill(ids, 0, cache))
        theirs = hf(torch.tensor([ids])).logits[0, -1].float()
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    q_proj = hf.model.layers[0].self_attn.q_proj.weight
    assert q_proj.data_ptr() == llm.model.layers[0].qkv_proj.weight.data_ptr()  # a view: no copy


def test_common_helpers(tmp_path):
    calls = []
    timing = common.median_time(lambda: calls.append(1), repeats=7, warmup=2, device="cpu")
    assert len(calls) == 9 and timing.calls == 7 and timing.p10 <= timing.median <= timing.p90
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
    (["--batches", "1,x"], "positive batch sizes"),
    (["--batches", "0"], "positive batch sizes"),
    (["--methods", "dense,foo"], "unknown method(s) foo; known: dense, lfps"),
    (["--models", "random:nope"], "unknown random-weight shape 'random:nope'"),
    (["--models", "no-such-model"], "neither a random-weight shape"),
    (["--hf-modes", "fast"], "one or both of eager, compiled"),
    (["--contexts", "4k", "--hf-context", "32k"], "32768 is not one of the contexts"),
    (["--steps", "1"], "--steps"),
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
        "e2e", "--models", "random:tiny-llama", "--contexts", "32k,4k,4096", "--batches", "8,1",
        "--methods", "lychee,dense,lychee", "--no-hf-baseline", "--out", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    opts = seen["opts"]
    assert (opts.contexts, opts.batches, opts.hf_modes) == ([4096, 32768], [1, 8], ())
    assert opts.methods == ["lychee", "dense"]
    assert seen["out"] == tmp_path and "TABLE" in result.output


def test_kernel_subcommand_calls_the_kernel_benchmark(monkeypatch):
    import sparsedecode.bench

    got = []
    fake = types.ModuleType("sparsedecode.bench.kernel_bench")
    fake.run = lambda contexts, batches: got.append((contexts, batches))
    monkeypatch.setitem(sys.modules, "sparsedecode.bench.kernel_bench", fake)
    monkeypatch.setattr(sparsedecode.bench, "kernel_bench", fake, raising=False)
    result = CliRunner().invoke(bench_cli.bench_group, ["kernel", "--contexts", "128k,32k", "--batches", "8"])
    assert result.exit_code == 0, result.output
    assert got == [((32768, 131072), (8,))]
    result = CliRunner().invoke(bench_cli.bench_group, ["kernel", "--contexts", "lots"])
    assert result.exit_code == 2 and "bad token count 'lots'" in result.output


def test_profiled_kernels_are_listed_under_the_table():
    """A step profiled with --profile gets its own table: the top kernels and the rest summed."""
    meta = dict(device="GPU", torch="2", transformers="5", date="today", copy_bandwidth=3e12, steps=30, warmup=5,
                budget=4096, roles="random:24")
    kernels = {f"kernel_{i}": float(20 - i) for i in range(e2e.PROFILE_TOP + 2)}
    row = dict(model="random:tiny-llama", context=131072, batch=1, method="lychee", p10_ms=1.0, p90_ms=1.2,
               ceiling_fraction=0.8,
               variants={"default": dict(weight=1.0, kernels_us=kernels)})
    text = e2e.results_markdown(dict(meta=meta, rows=[row], hf=[], notes=[]))
    assert "## Kernels of one step: random:tiny-llama 128K B1 lychee (default step" in text
    assert "| kernel_0 | 20.0 |" in text and "kernel_12" not in text
    assert "| (all others) | 15.0 |" in text  # kernel_12 and kernel_13: 8 + 7
