"""The eval runner and CLI on a fake LLM: files written, batching, reproducible prompts, intervals in the report,
resuming and merging results folders, input errors."""
from __future__ import annotations

import json
import os

import click
import pytest
from click.testing import CliRunner

from sparsedecode.evals import build_samples, merge_results, run_eval, write_prompts
from sparsedecode.evals.cli import eval_command, method_runs, parse_length
from sparsedecode.evals.report import write_json_atomic
from sparsedecode.utils import files as files_module
from test_evals_support import FakeLLM, fake_llm_class, smollm2_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = [("dense", {}), ("lychee", {"budget": 64})]


def oracle(suite, lengths, samples, seed, **options) -> FakeLLM:
    """A fake whose dense method knows the answers of the prompts `build_samples` makes for these arguments."""
    built, _ = build_samples(suite, smollm2_tokenizer(), lengths, samples, seed, **options)
    return FakeLLM(answers={s.prompt: s.references for s in built})


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_ruler_run_writes_json_markdown_and_plot(tmp_path):
    tasks = ["niah_single_1", "vt", "cwe", "qa_1"]
    llm = oracle("ruler", [1024, 2048], 2, 11, tasks=tasks)
    report = run_eval(llm, "ruler", METHODS, [2048, 1024], 2, 11, 3, tmp_path, tasks=tasks, model_name="fake",
                      progress=False)

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] and results["suite"] == "ruler" and results["seed"] == 11
    assert [m["label"] for m in results["methods"]] == ["dense", "lychee(budget=64)"]
    records = results["records"]
    assert len(records) == 3 * 2 * 2 * 2  # tasks (qa_1 skipped) x lengths x samples x methods
    assert {r["score"] for r in records if r["method"] == "dense"} == {1.0}
    assert {r["score"] for r in records if r["method"] != "dense"} == {0.0}
    assert {"task", "length", "index", "method", "prediction", "score", "depths", "references"} <= set(records[0])
    lychee = next(r for r in records if r["method"] == "lychee(budget=64)")
    assert (lychee["method_name"], lychee["options"], lychee["seed"]) == ("lychee", {"budget": 64}, 11)
    assert len(lychee["prompt_hash"]) == 16
    assert results["skipped"] == report.skipped and "SQuAD" in report.skipped["qa_1"]
    assert {(row["task"], row["length"], row["method"], row["score"]) for row in results["summary"]} >= {
        ("vt", 1024, "dense", 100.0), ("cwe", 2048, "lychee(budget=64)", 0.0)}

    # generated once, batched per length (tasks mixed: 3 tasks x 2 samples in batches of 3), shortest first,
    # every method on a batch in turn (so the engine prefills each batch once)
    assert llm.switches == [("dense", {}), ("lychee", {"budget": 64})] * 4
    assert llm.batches == [3] * 8
    assert [r["length"] for r in records[:12]] == [1024] * 12

    markdown = (tmp_path / "results.md").read_text()
    assert markdown == report.markdown
    assert "| task | length | dense | lychee(budget=64) |" in markdown
    assert "| niah_single_1 | 1K | 100.0 | 0.0 |" in markdown
    assert "| **Average** |  | 100.0 | 0.0 |" in markdown
    assert "- qa_1: no SQuAD v2 dev file given" in markdown
    # every method's average with its interval; the sparse one also paired with dense, prompt by prompt
    assert "## Averages with 95% intervals" in markdown and "stratified by task and length" in markdown
    assert "| dense | 100.0 | [100.0, 100.0] | 12 |  |  |  |" in markdown
    assert "| lychee(budget=64) | 0.0 | [0.0, 0.0] | 12 | -100.0 | [-100.0, -100.0] | 12 |" in markdown
    assert results["statistics"]["resamples"] == 10_000 and results["statistics"]["methods"] == report.statistics
    assert report.statistics[1]["difference"] == {"mean": -100.0, "low": -100.0, "high": -100.0, "prompts": 12}
    assert_png(tmp_path / "accuracy_vs_length.png")

    # the prompts are on disk and a second build with the same seed reproduces them exactly
    saved = json.loads((tmp_path / "samples.json").read_text())["samples"]
    again, _ = build_samples("ruler", smollm2_tokenizer(), [1024, 2048], 2, 11, tasks=tasks)
    assert [s["prompt"] for s in saved] == [s.prompt for s in again]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_needle_run_draws_a_heatmap(tmp_path):
    llm = oracle("needle", [1024, 2048], 1, 0, depths=[0.0, 0.5, 1.0])
    report = run_eval(llm, "needle", METHODS, [1024, 2048], 1, 0, 4, tmp_path, depths=[0.0, 0.5, 1.0],
                      progress=False)
    assert_png(tmp_path / "needle_heatmap.png")
    assert tmp_path / "needle_heatmap.png" in report.files
    assert "## Needle: dense (rows: depth, columns: length)" in report.markdown
    assert "| 0.50 | 100.0 | 100.0 |" in report.markdown


def test_reasoning_run(tmp_path):
    pytest.importorskip("reasoning_gym")
    llm = oracle("reasoning", [256], 2, 5)
    report = run_eval(llm, "reasoning", [("dense", {})], [256], 2, 5, 2, tmp_path, progress=False)
    assert report.summary == [{"task": "gsm_symbolic", "length": 256, "method": "dense", "score": 100.0,
                               "samples": 2}]


def test_reasoning_problems_file(tmp_path):
    pytest.importorskip("reasoning_gym")
    path = tmp_path / "problems.jsonl"
    result = CliRunner().invoke(eval_command, ["export-problems", "--samples", "3", "--seed", "5", "--out", str(path)])
    assert result.exit_code == 0, result.output
    tokenizer = smollm2_tokenizer()
    from_file, _ = build_samples("reasoning", tokenizer, [256], 2, 5, problems=path)
    generated, _ = build_samples("reasoning", tokenizer, [256], 2, 5)
    assert [(s.prompt, s.references) for s in from_file] == [(s.prompt, s.references) for s in generated]
    with pytest.raises(ValueError, match="fewer than the 4 asked for"):
        build_samples("reasoning", tokenizer, [256], 4, 5, problems=path)
    with pytest.raises(ValueError, match="holds 3 problems, fewer than the 4 asked for .--samples times"):
        build_samples("reasoning", tokenizer, [256], 2, 5, problems=path, problems_per_prompt=2)
    chained, _ = build_samples("reasoning", tokenizer, [256], 1, 5, problems=path, problems_per_prompt=3)
    assert chained[0].references == [s.references[0] for s in
                                     build_samples("reasoning", tokenizer, [256], 3, 5, problems=path)[0]]
    path.write_text('{"question": "2 + 2?"}\n')
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        build_samples("reasoning", tokenizer, [256], 1, 5, problems=path)


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"version": 1})

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(files_module.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_json_atomic(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["results.json"]


TASKS = ["niah_single_2", "vt"]
LENGTHS = [1024, 2048]


def ruler_run(out_dir, llm, lengths=LENGTHS, methods=METHODS, seed=3, model_name="fake", **options):
    return run_eval(llm, "ruler", methods, lengths, 2, seed, 2, out_dir, tasks=TASKS, model_name=model_name,
                    progress=False, **options)


def results_of(folder):
    return json.loads((folder / "results.json").read_text())


def test_interrupted_run_resumes_to_the_records_of_one_run(tmp_path):
    ruler_run(tmp_path / "once", oracle("ruler", LENGTHS, 2, 3, tasks=TASKS))
    expected = results_of(tmp_path / "once")

    dying = oracle("ruler", LENGTHS, 2, 3, tasks=TASKS)
    dying.fail_after = 3  # dies on the 4th batch
    with pytest.raises(RuntimeError, match="went away"):
        ruler_run(tmp_path / "split", dying)
    checkpoint = results_of(tmp_path / "split")  # written as the run died
    assert not checkpoint["complete"] and len(checkpoint["records"]) == 3 * 2

    resumed = oracle("ruler", LENGTHS, 2, 3, tasks=TASKS)
    report = ruler_run(tmp_path / "split", resumed)
    assert sum(resumed.batches) == len(expected["records"]) - 6  # only what was missing
    assert "6 of 16 generations were there already" in report.notes[0]
    assert results_of(tmp_path / "split") == expected
    assert (tmp_path / "split" / "results.md").read_text() == (tmp_path / "once" / "results.md").read_text()

    again = oracle("ruler", LENGTHS, 2, 3, tasks=TASKS)
    ruler_run(tmp_path / "split", again)  # nothing left to do
    assert again.batches == [] and results_of(tmp_path / "split") == expected


def test_calls_split_by_length_and_budget_fill_one_folder(tmp_path):
    both_budgets = [*METHODS, ("lychee", {"budget": 128})]
    ruler_run(tmp_path / "once", oracle("ruler", LENGTHS, 2, 3, tasks=TASKS), methods=both_budgets)

    ruler_run(tmp_path / "split", oracle("ruler", [1024], 2, 3, tasks=TASKS), lengths=[1024])
    second = oracle("ruler", [2048], 2, 3, tasks=TASKS)
    ruler_run(tmp_path / "split", second, lengths=[2048])
    assert sum(second.batches) == 2 * 4  # both methods at 2K only
    third = oracle("ruler", LENGTHS, 2, 3, tasks=TASKS)
    report = ruler_run(tmp_path / "split", third, methods=[("dense", {}), ("lychee", {"budget": 128})])
    assert third.switches == [("lychee", {"budget": 128})] * 4  # dense was done: only the new budget ran
    assert results_of(tmp_path / "split")["records"] == results_of(tmp_path / "once")["records"]
    assert [row["method"] for row in report.statistics] == ["dense", "lychee(budget=64)", "lychee(budget=128)"]


def test_merge_of_folders_equals_one_run(tmp_path):
    ruler_run(tmp_path / "once", oracle("ruler", LENGTHS, 2, 3, tasks=TASKS))
    ruler_run(tmp_path / "short", oracle("ruler", [1024], 2, 3, tasks=TASKS), lengths=[1024])
    ruler_run(tmp_path / "long", oracle("ruler", [2048], 2, 3, tasks=TASKS), lengths=[2048])
    ruler_run(tmp_path / "dense", oracle("ruler", LENGTHS, 2, 3, tasks=TASKS), methods=[("dense", {})])

    report = merge_results(tmp_path / "merged", [tmp_path / "long", tmp_path / "short", tmp_path / "dense"])
    merged = results_of(tmp_path / "merged")
    assert merged["records"] == results_of(tmp_path / "once")["records"]
    assert merged["complete"] and report.notes == ["merged 16 records of 2 method runs"]
    samples = json.loads((tmp_path / "merged" / "samples.json").read_text())["samples"]
    assert len(samples) == 2 * 2 * 2

    result = CliRunner().invoke(eval_command, ["merge", str(tmp_path / "cli"), str(tmp_path / "short"),
                                               str(tmp_path / "long")])
    assert result.exit_code == 0, result.output
    assert "| lychee(budget=64) | 0.0 | [0.0, 0.0] | 8 | -100.0 |" in result.output
    assert results_of(tmp_path / "cli")["records"] == merged["records"]

    merge_results(tmp_path / "one-task", [tmp_path / "long", tmp_path / "short"], tasks={TASKS[1]})
    kept = results_of(tmp_path / "one-task")["records"]
    assert kept == [r for r in merged["records"] if r["task"] == TASKS[1]] and len(kept) == 8
    with pytest.raises(ValueError, match="no results of task.s. niah_nothing"):
        merge_results(tmp_path / "typo", [tmp_path / "long"], tasks={TASKS[1], "niah_nothing"})


def test_prompts_restore_a_folder_kept_without_them(tmp_path):
    ruler_run(tmp_path / "run", oracle("ruler", [1024], 2, 3, tasks=TASKS), lengths=[1024])
    original = (tmp_path / "run" / "samples.json").read_text()
    (tmp_path / "run" / "samples.json").unlink()  # as docs/data keeps a folder
    with pytest.raises(ValueError, match="has results but no samples.json .* plus --prompts-only"):
        merge_results(tmp_path / "merged", [tmp_path / "run"])
    with pytest.raises(ValueError, match="has results but no samples.json"):  # nor resumed
        ruler_run(tmp_path / "run", FakeLLM(), lengths=[1024])

    with pytest.raises(ValueError, match=r"8 of the 8 records of .*results.json name no prompt of these settings "
                                         r"\(first: dense on niah_single_2 at length 1024, sample 0\); give the"):
        write_prompts(smollm2_tokenizer(), "ruler", [2048], 2, 3, tmp_path / "run", model_name="fake", tasks=TASKS)
    with pytest.raises(ValueError, match="has seed 3 but the prompts of these settings has seed 4"):
        write_prompts(smollm2_tokenizer(), "ruler", [1024], 2, 4, tmp_path / "run", model_name="fake", tasks=TASKS)
    assert not (tmp_path / "run" / "samples.json").exists()  # a refused restore writes nothing
    path, count = write_prompts(smollm2_tokenizer(), "ruler", [1024], 2, 3, tmp_path / "run", model_name="fake",
                                tasks=TASKS)
    assert (path, count) == (tmp_path / "run" / "samples.json", 4)
    assert path.read_text() == original

    # resumable again: a longer run into the folder decodes only the new length
    resumed = oracle("ruler", LENGTHS, 2, 3, tasks=TASKS)
    ruler_run(tmp_path / "run", resumed)
    assert sum(resumed.batches) == 2 * 2 * 2  # 2K only: 2 tasks x 2 samples x 2 methods
    assert results_of(tmp_path / "run")["records"] == results_of(ruler_once(tmp_path))["records"]


def ruler_once(tmp_path):
    ruler_run(tmp_path / "once", oracle("ruler", LENGTHS, 2, 3, tasks=TASKS))
    return tmp_path / "once"


def test_cli_prompts_only_loads_no_model(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("--prompts-only loaded the model")

    monkeypatch.setattr("sparsedecode.evals.cli.LLM", no_model)
    monkeypatch.setattr("sparsedecode.evals.cli.load_tokenizer", lambda model: smollm2_tokenizer())
    result = CliRunner().invoke(eval_command, ["ruler", "--model", "fake", "--lengths", "1k", "--samples", "2",
                                               "--seed", "3", "--tasks", ",".join(TASKS), "--prompts-only",
                                               "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'samples.json'}: 4 prompts" in result.output
    written = json.loads((tmp_path / "samples.json").read_text())
    built, _ = build_samples("ruler", smollm2_tokenizer(), [1024], 2, 3, tasks=TASKS)
    assert [s["prompt"] for s in written["samples"]] == [s.prompt for s in built]
    assert (written["suite"], written["model"], written["seed"]) == ("ruler", "fake", 3)
    assert not (tmp_path / "results.json").exists()


def test_mismatched_results_are_not_merged(tmp_path):
    ruler_run(tmp_path / "a", FakeLLM(), lengths=[1024])
    for key, settings in [("seed", {"seed": 4}), ("model", {"model_name": "other"})]:
        ruler_run(tmp_path / key, FakeLLM(), lengths=[1024], **settings)
        with pytest.raises(ValueError, match=f"has {key} .* cannot be merged"):
            merge_results(tmp_path / "merged", [tmp_path / "a", tmp_path / key])
        with pytest.raises(ValueError, match=f"has {key} .* cannot be merged"):  # nor resumed into
            ruler_run(tmp_path / "a", FakeLLM(), lengths=[1024], **settings)
    with pytest.raises(ValueError, match="has suite 'needle'"):
        run_eval(FakeLLM(), "needle", METHODS, [1024], 1, 3, 2, tmp_path / "a", model_name="fake", progress=False)

    haystack = tmp_path / "haystack.txt"
    haystack.write_text("Other text fills this haystack. It has a few sentences. " * 40)
    ruler_run(tmp_path / "other-text", FakeLLM(), lengths=[1024], haystack=haystack)
    with pytest.raises(ValueError, match="the prompt of niah_single_2 at length 1024, sample 0 differs"):
        merge_results(tmp_path / "merged", [tmp_path / "a", tmp_path / "other-text"])

    legacy = results_of(tmp_path / "a")
    for record in legacy["records"]:
        del record["prompt_hash"]
    write_json_atomic(tmp_path / "a" / "results.json", legacy)
    with pytest.raises(ValueError, match="before records carried their keys"):
        merge_results(tmp_path / "merged", [tmp_path / "a"])
    assert not (tmp_path / "merged").exists()  # nothing written by a refused merge

    result = CliRunner().invoke(eval_command, ["merge", str(tmp_path / "merged"), str(tmp_path / "seed"),
                                               str(tmp_path / "model")])
    assert result.exit_code != 0 and "results of a different model cannot be merged" in result.output


def test_a_label_whose_default_roles_changed_is_not_resumed(tmp_path, monkeypatch):
    """The label `lychee(budget=64)` says nothing of the roles a method resolves without `roles`; a folder
    decoded with other default roles (a newer shipped file) must not pass for this run's results."""
    from sparsedecode.methods import lychee
    from sparsedecode.models.config import model_config_from_hf
    from sparsedecode.models.shapes import random_shape_config
    from sparsedecode.roles.head_roles import resolve_roles

    config = model_config_from_hf(random_shape_config("random:tiny-llama"))
    ruler_run(tmp_path / "a", FakeLLM(config=config), lengths=[1024])
    entry = next(m for m in results_of(tmp_path / "a")["methods"] if m["label"] == "lychee(budget=64)")
    assert entry["roles"] == resolve_roles("tidal", config, "tidal").fingerprint()  # lychee's default here
    assert "roles" not in next(m for m in results_of(tmp_path / "a")["methods"] if m["label"] == "dense")
    ruler_run(tmp_path / "a", FakeLLM(config=config), lengths=[1024, 2048])  # same roles: resumes

    monkeypatch.setattr(lychee.Lychee, "default_roles", "random:3")  # as if another default had shipped
    changed = r"lychee\(budget=64\) decoded with head roles .* other roles .*roles=learned:6"
    with pytest.raises(ValueError, match=changed):
        ruler_run(tmp_path / "a", FakeLLM(config=config), lengths=[1024, 2048])
    ruler_run(tmp_path / "b", FakeLLM(config=config), lengths=[1024])
    with pytest.raises(ValueError, match="used other roles"):  # nor merged
        merge_results(tmp_path / "merged", [tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "merged").exists()


def test_bad_arguments_are_refused(tmp_path):
    llm = FakeLLM()
    with pytest.raises(ValueError, match="each name and options once"):
        run_eval(llm, "ruler", [("dense", {}), ("dense", {})], [1024], 1, 0, 1, tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown suite"):
        run_eval(llm, "longbench", METHODS, [1024], 1, 0, 1, tmp_path, progress=False)
    with pytest.raises(ValueError, match="no task left"):
        run_eval(llm, "ruler", METHODS, [1024], 1, 0, 1, tmp_path, tasks=["qa_2"], progress=False)


@pytest.mark.parametrize("text, tokens", [("4k", 4096), ("32K", 32768), ("32768", 32768), ("1m", 1 << 20)])
def test_length_forms(text, tokens):
    assert parse_length(text) == tokens


def test_method_runs_apply_budgets_and_options():
    runs = method_runs(["dense", "lychee", "quest"], [512, 1024], ("page_size=32", "lychee:dense_every=32"))
    assert runs == [("dense", {}), ("lychee", {"dense_every": 32, "budget": 512}),
                    ("lychee", {"dense_every": 32, "budget": 1024}),
                    ("quest", {"page_size": 32, "budget": 512}), ("quest", {"page_size": 32, "budget": 1024})]


def test_variants_add_runs_of_the_same_method():
    runs = method_runs(["dense", "lychee"], [512], ("lychee:dense_every=32",),
                       ("lychee:roles=all", "quest:page_size=32"))
    assert runs == [("dense", {}), ("lychee", {"dense_every": 32, "budget": 512}),
                    ("lychee", {"dense_every": 32, "roles": "all", "budget": 512}),
                    ("quest", {"page_size": 32, "budget": 512})]
    for bad in ("lychee", "lychee:", "nosuch:roles=all", "lychee:page_size=16"):
        with pytest.raises(click.BadParameter):
            method_runs(["dense"], [], (), (bad,))


def test_cli_runs_a_suite(tmp_path, monkeypatch):
    created: list[FakeLLM] = []
    monkeypatch.setattr("sparsedecode.evals.cli.LLM", fake_llm_class(created))
    result = CliRunner().invoke(eval_command, [
        "ruler", "--model", "smollm2-135m", "--methods", "dense,lychee", "--budget", "64,128", "--lengths", "1k",
        "--samples", "1", "--tasks", "niah_single_1,fwe", "--batch-size", "2", "--gpu-memory-utilization", "0.4",
        "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert created[0].constructed_with == {"model": "smollm2-135m", "max_context": 1024 + 128,
                                           "gpu_memory_utilization": 0.4}
    results = json.loads((tmp_path / "results.json").read_text())
    assert [m["label"] for m in results["methods"]] == ["dense", "lychee(budget=64)", "lychee(budget=128)"]
    assert "| fwe | 1K |" in result.output
    assert_png(tmp_path / "accuracy_vs_length.png")


def test_cli_refuses_what_the_engine_cannot_run_before_writing_anything(tmp_path, monkeypatch):
    """A suite whose longest prompt and answer do not fit the engine's pool, or a seed the engine refuses,
    stops before the folder is made (not after writing the prompts of a run that can never go)."""
    monkeypatch.setattr("sparsedecode.evals.cli.LLM", fake_llm_class([], pool_tokens=2048))
    common = ["--model", "smollm2-135m", "--samples", "1", "--tasks", "niah_single_1"]
    result = CliRunner().invoke(eval_command, ["ruler", *common, "--lengths", "4k", "--out", str(tmp_path / "a")])
    assert result.exit_code == 1 and "but the pool holds 2048" in result.output, result.output
    result = CliRunner().invoke(eval_command, ["ruler", *common, "--lengths", "1k", "--seed", str(2**64),
                                               "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "seed must be a 64-bit integer" in result.output, result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    result = CliRunner().invoke(eval_command, ["ruler", *common, "--lengths", "1k", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0 and (tmp_path / "c" / "results.json").exists(), result.output


def test_cli_reasoning_chains_problems_and_sizes_the_context_for_them(tmp_path, monkeypatch):
    pytest.importorskip("reasoning_gym")
    problems = tmp_path / "problems.jsonl"
    assert CliRunner().invoke(eval_command, ["export-problems", "--samples", "4", "--out", str(problems)]).exit_code == 0
    created: list[FakeLLM] = []
    monkeypatch.setattr("sparsedecode.evals.cli.LLM", fake_llm_class(created))
    result = CliRunner().invoke(eval_command, [
        "reasoning", "--model", "smollm2-135m", "--lengths", "512", "--samples", "2", "--problems-per-prompt", "2",
        "--problems", str(problems), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert created[0].constructed_with["max_context"] == 512 + 2 * 1024  # two problems' prompt allowance
    records = results_of(tmp_path / "out")["records"]
    assert [(r["task"], len(r["references"])) for r in records] == [("gsm_symbolic_x2", 2)] * 2


@pytest.mark.parametrize("arguments, message", [
    (["ruler", "--lengths", "4x"], "not a token count"),
    (["ruler", "--methods", "dense,warp"], "unknown method(s) warp"),
    (["ruler", "--tasks", "niah_single_9"], "unknown task(s) niah_single_9"),
    (["ruler", "--method-option", "budget"], "KEY=VALUE"),
    (["ruler", "--methods", "dense", "--method-option", "page_size=3"], "no selected method takes option"),
    (["needle", "--depths", "0,1.5"], "from 0 (start) to 1 (end)"),
    (["ruler", "--samples", "0"], "--samples"),
    (["ruler", "--squad", "/no/such/file.json"], "does not exist"),
    (["ruler", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["reasoning", "--problems-per-prompt", "0"], "--problems-per-prompt"),
])
def test_cli_input_errors(arguments, message, monkeypatch):
    monkeypatch.setattr("sparsedecode.evals.cli.LLM", fake_llm_class([]))
    result = CliRunner().invoke(eval_command, [*arguments, "--model", "m", "--out", "/tmp/never"])
    assert result.exit_code != 0
    assert message in result.output
