"""The command line: user errors are one `Error:` line and a non-zero exit, refused before any weights load;
`methods` and `models list` tell what there is; `--help` does not import torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sparsedecode.cli import OPTION_HELP, main, method_classes
from sparsedecode.models import loader
from sparsedecode.models.registry import MODELS
from sparsedecode.roles.head_roles import resolve_roles

from tiny_gguf import CONTEXT, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if any weights are read: every error must come before that."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the error")

    monkeypatch.setattr(loader, "_from_transformers", loaded)
    monkeypatch.setattr(loader, "_registry_weights", loaded)


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def assert_one_error_line(result, *phrases: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    # click's own exit, not an exception escaping it
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


@pytest.mark.parametrize("args, phrases", [
    (["--method", "foo"], ["unknown method 'foo'", "lychee"]),
    (["--method", "lychie"], ["did you mean lychee?"]),
    (["-o", "budget=1024"], ["'dense'", "budget", "no options", "sparsedecode methods"]),
    (["--method", "quest", "-o", "topk=5"], ["topk", "page_size"]),
    (["--method", "lychee", "-o", "budget=0"], ["budget must be a positive", "not 0"]),
    (["--method", "quest", "-o", "budget=-64"], ["budget must be a positive", "not -64"]),
    (["--method", "streaming", "-o", "budget=lots"], ["budget must be a positive", "'lots'"]),
    (["--method", "lychee", "-o", "budget"], ["'budget' is not key=value"]),
    (["-n", "0"], ["--max-new-tokens", "0 is not in the range"]),
    (["--seed", str(2**70)], ["seed must be a 64-bit integer"]),
    (["-t", "inf"], ["temperature must be a finite number"]),
    (["--repetition-penalty", "0"], ["repetition_penalty must be a finite number > 0"]),
    (["--top-k", "-1"], ["--top-k", "-1 is not in the range"]),
    (["-m", "smolm2-135m"], ["did you mean smollm2-135m?"]),
    (["-m", "/no/such/model.gguf"], ["neither a registry model nor an existing path", ".gguf file"]),
    (["-m", "random:tiny-llama"], ["no tokenizer"]),
    (["--device", "cuda:0" if not torch.cuda.is_available() else "nonsense"], ["--device"]),
])
def test_generate_refuses_bad_arguments_in_one_line(no_weights, args, phrases):
    assert_one_error_line(run("generate", "-p", "hello", *args), *phrases)


def test_non_gguf_file_and_non_model_folder(no_weights, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    assert_one_error_line(run("generate", "-p", "hi", "-m", str(text)), "not a GGUF file")
    assert_one_error_line(run("generate", "-p", "hi", "-m", str(tmp_path)), "without config.json")


def test_empty_prompt(no_weights):
    assert_one_error_line(run("generate", input="  \n"), "empty prompt")


def test_prompt_over_the_context(no_weights, tiny):
    long_prompt = "abc " * CONTEXT
    assert_one_error_line(run("generate", "-m", str(tiny), "--raw", "-p", long_prompt),
                          "exceeds the 256-token context", "shorten the prompt")
    # fits alone, but not with the tokens asked for
    assert_one_error_line(run("generate", "-m", str(tiny), "-p", "hi", "-n", str(CONTEXT)),
                          f"--max-new-tokens {CONTEXT}", "lower -n")


def test_unsupported_architecture(no_weights, tmp_path):
    gguf = write_tiny_gguf(tmp_path / "stablelm.gguf", architecture="stablelm")
    assert_one_error_line(run("generate", "-m", str(gguf), "-p", "hi"), "'stablelm' is not supported", "llama")


def test_roles_file_of_another_model(no_weights, tiny, tmp_path):
    other = loader.load_config("random:tiny-llama")
    roles = tmp_path / "roles.json"
    resolve_roles("tidal", other, "tidal").save(roles)
    assert_one_error_line(run("generate", "-m", str(tiny), "-p", "hi", "--method", "lychee", "-o", f"roles={roles}"),
                          "head roles were made for", "calibrate")
    assert_one_error_line(run("generate", "-m", str(tiny), "-p", "hi", "--method", "lychee",
                              "-o", f"roles={tmp_path / 'missing.json'}"), "does not exist")


def test_option_value_the_method_refuses(no_weights, tiny):
    assert_one_error_line(run("generate", "-m", str(tiny), "-p", "hi", "--method", "lfps", "-o", "block_size=48"),
                          "block_size must be 16, 32, 64 or 128")


def test_generate_runs_on_a_valid_request(tiny):
    result = run("generate", "-m", str(tiny), "-p", "hello", "-n", "3", "--raw")
    assert result.exit_code == 0, (result.output, result.exception)


def test_generate_samples_with_top_k_and_the_repetition_penalty(tiny):
    """--top-k 1 keeps only the most likely token, so a hot sampler decodes the greedy text; the repetition
    penalty changes it."""
    args = ["generate", "-m", str(tiny), "-p", "hello hello hello", "-n", "12", "--raw"]
    greedy = run(*args)
    assert greedy.exit_code == 0, (greedy.output, greedy.exception)
    assert run(*args, "-t", "2", "--seed", "1", "--top-k", "1").stdout == greedy.stdout
    assert run(*args, "-t", "2", "--seed", "1").stdout != greedy.stdout
    penalized = run(*args, "--repetition-penalty", "1.8")
    assert penalized.exit_code == 0 and penalized.stdout != greedy.stdout


@pytest.mark.parametrize("methods, phrase", [
    ("foo", "unknown method 'foo'"), ("dense,streem", "did you mean streaming?"), (" , ", "give at least one method"),
])
def test_demo_refuses_unknown_methods(no_weights, methods, phrase):
    assert_one_error_line(run("demo", "--methods", methods), "--methods", phrase)


@pytest.mark.slow
def test_demo_runs_every_method_it_is_given():
    """The README's main job on the CI model: the needle prompt through each method, then the table."""
    result = run("demo", "-m", "smollm2-135m", "--context", "1024", "--methods", "dense,lychee,lychee+lfps",
                 "--device", "cpu")
    assert result.exit_code == 0, (result.output, result.exception)
    table = " ".join(result.stdout[result.stdout.index("needle value"):].split())  # rich wraps at 80 columns
    for method in ("dense", "lychee", "lychee+lfps", "KV read", "100.0%", "about dense's speed"):
        assert method in table, method


def test_demo_context_over_the_model(no_weights, tiny):
    assert_one_error_line(run("demo", "-m", str(tiny), "--context", "4096"), "context of 256 tokens")


def test_models_pull_typo():
    assert_one_error_line(run("models", "pull", "qwen2.5-coder-1.5"), "did you mean qwen2.5-coder-1.5b")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for machines without a GPU")
def test_bench_kernel_needs_a_gpu():
    assert_one_error_line(run("bench", "kernel"), "needs a CUDA GPU")


def test_methods_lists_every_option_with_its_default_and_help():
    result = run("methods")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    for name, cls in method_classes().items():
        assert f"{name}: " in result.output
        for key, default in cls.defaults.items():
            assert key in OPTION_HELP, f"option {key!r} of {name} has no line in OPTION_HELP"
            shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
            assert f"{key}={shown} {' '.join(OPTION_HELP[key].split())}" in out
    note = " ".join(result.output.split())
    assert "GPU property" in note and "about dense's speed" in note


def test_models_list_shows_provenance():
    result = run("models", "list")
    assert result.exit_code == 0, result.output
    for spec in MODELS.values():
        assert spec.upstream and spec.quantization and spec.license
        for value in (spec.name, spec.upstream, spec.quantization, spec.license, spec.sha256,
                      spec.parts[0].requirement):
            assert value in result.output


def test_help_and_version_do_not_import_torch():
    # a fresh interpreter, as the `sparsedecode` script starts one
    code = ("import sys; from click.testing import CliRunner; from sparsedecode.cli import main; "
            "r = [CliRunner().invoke(main, a) for a in (['--help'], ['--version'], ['models', '--help'])]; "
            "assert all(x.exit_code == 0 for x in r), [x.output for x in r]; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"--help imported {done.stdout.strip()}"
    listed = run("--help").output
    assert all(f"  {name} " in listed for name in ("eval", "bench", "calibrate", "methods", "generate"))
