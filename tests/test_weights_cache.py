"""The converted-weights cache of registry models: written on the first load, used on the next ones,
refused (and rebuilt) when its key, the GGUF's sha256 and the dtype, does not match."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparsedecode.models import loader, registry
from sparsedecode.models.registry import MODELS, ModelSpec, PackagePart, converted_folder, converted_weights
from sparsedecode.utils.files import atomic_path

from tiny_gguf import write_tiny_gguf

NAME = "tiny-cached"


def place_in_registry(spec: ModelSpec, gguf: Path) -> None:
    """Put `gguf` in the cache as a pulled, verified registry model (nothing is downloaded)."""
    final = registry.model_path(spec.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        os.link(gguf, final)
    final.with_name(final.name + ".verified").write_text(spec.sha256 + "\n")


@pytest.fixture
def tiny_registry_model(tmp_path, monkeypatch) -> ModelSpec:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = gguf.read_bytes()
    spec = ModelSpec(NAME, (PackagePart("tiny-cached==1.0", "tiny.gguf"),), "tiny.gguf", len(data),
                     hashlib.sha256(data).hexdigest(), "llama", "test model", 256)
    monkeypatch.setitem(MODELS, NAME, spec)
    monkeypatch.setenv("SPARSEDECODE_CACHE", str(tmp_path / "cache"))
    place_in_registry(spec, gguf)
    return spec


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """Records every run of the slow path (transformers reading the GGUF's weights)."""
    calls: list[str] = []
    slow = loader._from_transformers

    def spy(folder, gguf_file, *args):
        calls.append(gguf_file)
        return slow(folder, gguf_file, *args)

    monkeypatch.setattr(loader, "_from_transformers", spy)
    return calls


def fresh_process() -> None:
    """Forget what this process memoised, as a new `sparsedecode` run would."""
    loader._auto_config.cache_clear()
    loader._auto_tokenizer.cache_clear()


def assert_same_model(a: loader.LoadedModel, b: loader.LoadedModel) -> None:
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].dtype == wb[key].dtype and torch.equal(wa[key], wb[key]), key
    assert a.config.identity() == b.config.identity()
    assert a.config.tie_word_embeddings == b.config.tie_word_embeddings
    assert b.model.lm_head.weight is b.model.embed_tokens.weight  # still tied after the cache
    text = "<|im_start|>user\nhello, cache<|im_end|>\n"
    assert a.tokenizer(text).input_ids == b.tokenizer(text).input_ids
    message = [{"role": "user", "content": "hi"}]
    assert (a.tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
            == b.tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True))
    x = torch.randn(3, a.config.hidden_size)
    torch.testing.assert_close(a.model.logits(x), b.model.logits(x), rtol=0, atol=0)


def test_second_load_reads_the_cache_not_the_gguf(tiny_registry_model, conversions):
    first = loader.load_model(NAME, "cpu")
    assert conversions == ["tiny.gguf"]
    cached = converted_weights(NAME, "float32")
    assert cached.is_file() and (converted_folder(NAME) / "config.json").is_file()
    with safe_open(cached, "pt") as f:
        assert f.metadata() == {"gguf_sha256": tiny_registry_model.sha256, "dtype": "float32",
                                "format": loader.CONVERTED_FORMAT}
    fresh_process()
    second = loader.load_model(NAME, "cpu")
    assert conversions == ["tiny.gguf"]  # the slow path ran once
    assert_same_model(first, second)
    assert not [p for p in cached.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind


def test_config_and_tokenizer_come_from_the_cache_folder(tiny_registry_model, monkeypatch):
    loader.load_config(NAME)
    fresh_process()
    read: list[tuple] = []
    original = loader._auto_config.__wrapped__
    monkeypatch.setattr(loader, "_auto_config", lambda *args: read.append(args) or original(*args))
    loader.load_config(NAME)
    assert read and read[0][:2] == (str(converted_folder(NAME)), None)  # not the GGUF (which parses for seconds)


def test_other_dtype_is_converted_and_cached_separately(tiny_registry_model, conversions):
    f32 = loader.load_model(NAME, "cpu")
    bf16 = loader.load_model(NAME, "cpu", torch.bfloat16)
    assert conversions == ["tiny.gguf", "tiny.gguf"]
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert converted_weights(NAME, "bfloat16").is_file() and converted_weights(NAME, "float32").is_file()
    fresh_process()
    assert_same_model(f32, loader.load_model(NAME, "cpu"))
    assert len(conversions) == 2


def test_cache_of_another_gguf_is_refused_and_rebuilt(tiny_registry_model, conversions, monkeypatch, tmp_path):
    loader.load_model(NAME, "cpu")
    # The registry now pins another file under the same name (a new release): the old cache must not serve it.
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    data = other.read_bytes()
    spec = dataclasses.replace(tiny_registry_model, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(MODELS, NAME, spec)
    registry.model_path(NAME).unlink()
    place_in_registry(spec, other)
    fresh_process()
    rebuilt = loader.load_model(NAME, "cpu")
    assert conversions == ["tiny.gguf", "tiny.gguf"]
    with safe_open(converted_weights(NAME, "float32"), "pt") as f:
        assert f.metadata()["gguf_sha256"] == spec.sha256
    assert '"gguf_sha256": "%s"' % spec.sha256 in (converted_folder(NAME) / loader.KEY_FILE).read_text()
    fresh_process()
    assert_same_model(rebuilt, loader.load_model(NAME, "cpu"))
    assert len(conversions) == 2


@pytest.mark.parametrize("metadata", [
    {"dtype": "bfloat16"},  # a file of another dtype under this name
    {"gguf_sha256": "0" * 64},  # converted from another GGUF
    {"format": "0"},  # an older converted form
])
def test_cache_whose_key_does_not_match_is_rebuilt(tiny_registry_model, conversions, metadata):
    first = loader.load_model(NAME, "cpu")
    path = converted_weights(NAME, "float32")
    with safe_open(path, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        key = f.metadata()
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, path, metadata={**key, **metadata})
    fresh_process()
    again = loader.load_model(NAME, "cpu")
    assert len(conversions) == 2
    assert_same_model(first, again)  # the zeroed weights under the wrong key were not used
    with safe_open(path, "pt") as f:
        assert f.metadata() == key


def test_truncated_cache_is_rebuilt(tiny_registry_model, conversions):
    first = loader.load_model(NAME, "cpu")
    path = converted_weights(NAME, "float32")
    path.write_bytes(path.read_bytes()[:1000])
    fresh_process()
    assert_same_model(first, loader.load_model(NAME, "cpu"))
    assert len(conversions) == 2


def test_failed_cache_write_leaves_no_file_and_still_loads(tiny_registry_model, conversions, monkeypatch):
    def disk_full(state, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.warns(UserWarning, match="could not cache the converted weights"):
        loaded = loader.load_model(NAME, "cpu")
    assert loaded.model.embed_tokens.weight.shape[1] == loaded.config.hidden_size
    folder = converted_weights(NAME, "float32").parent
    assert not converted_weights(NAME, "float32").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"new, half written")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.slow
def test_real_model_second_load_matches_and_skips_the_gguf(tmp_path, monkeypatch, conversions):
    """smollm2-135m: the cached weights are the converted ones, bit for bit."""
    pulled = registry.pull_model("smollm2-135m")  # the shared cache; this test's own cache is tmp_path
    monkeypatch.setenv("SPARSEDECODE_CACHE", str(tmp_path))
    place_in_registry(MODELS["smollm2-135m"], pulled)
    first = loader.load_model("smollm2-135m", "cpu")
    assert len(conversions) == 1
    fresh_process()
    second = loader.load_model("smollm2-135m", "cpu")
    assert len(conversions) == 1
    assert_same_model(first, second)
