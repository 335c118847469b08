"""Head-role presets, the roles file format and its errors."""
from __future__ import annotations

import json

import pytest
import torch

from sparsedecode.models.config import model_config_from_hf
from sparsedecode.models.shapes import random_shape_config
from sparsedecode.roles import head_roles
from sparsedecode.roles.head_roles import HeadRoles, RolesMismatchError, resolve_roles


@pytest.fixture(scope="module")
def llama():
    return model_config_from_hf(random_shape_config("random:llama-3.1-8b"))


@pytest.fixture(scope="module")
def tiny():
    return model_config_from_hf(random_shape_config("random:tiny-llama"))


@pytest.fixture(scope="module")
def qwen_1_5b():
    """The shape of qwen2.5-coder-1.5b (no weights): what its shipped roles files record."""
    from transformers import AutoConfig

    return model_config_from_hf(AutoConfig.for_model(
        "qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936,
    ))


def test_presets(llama) -> None:
    layers, heads = llama.num_layers, llama.num_kv_heads
    assert resolve_roles("all", llama, "tidal").retrieval.all()
    tidal = resolve_roles("tidal", llama, "tidal").retrieval
    assert tidal.all(1).nonzero().flatten().tolist() == [0, 1, 2, layers // 2]
    assert (tidal.any(1) == tidal.all(1)).all()  # whole layers
    assert resolve_roles("tidal:13", llama, "tidal").retrieval.all(1).nonzero().flatten().tolist() == [0, 1, 2, 13]
    random = resolve_roles("random:24", llama, "tidal")
    assert random.num_retrieval == 24 + heads and random.retrieval[0].all()
    assert torch.equal(random.retrieval, resolve_roles("random:24", llama, "tidal").retrieval)  # seeded


def test_roles_without_a_name_use_the_default_when_nothing_is_shipped(tiny) -> None:
    assert torch.equal(resolve_roles(None, tiny, "tidal").retrieval, resolve_roles("tidal", tiny, "tidal").retrieval)
    with pytest.raises(ValueError, match="no learned roles"):
        resolve_roles("learned", tiny, "tidal")


def test_roles_file_round_trip_and_mismatch(llama, tiny, tmp_path) -> None:
    roles = resolve_roles("random:5", tiny, "tidal")
    path = tmp_path / "roles.json"
    roles.save(path)
    again = resolve_roles(str(path), tiny, "tidal")
    assert torch.equal(again.retrieval, roles.retrieval) and again.source == roles.source
    with pytest.raises(RolesMismatchError, match="head roles were made for"):
        resolve_roles(str(path), llama, "tidal")
    data = json.loads(path.read_text())
    data["model"]["config_hash"] = "0" * 16  # same shape, another model
    path.write_text(json.dumps(data))
    with pytest.raises(RolesMismatchError, match="calibrate roles for this model"):
        HeadRoles.load(path).check_fits(tiny)


@pytest.mark.parametrize("spec, message", [
    ("tidal:2", "re-selection layer must lie in 3"),
    ("tidal:999", "re-selection layer must lie in 3"),
    ("random:100000", "random:N needs"),
    ("most", "unknown roles"),
    ("missing.json", "does not exist"),
])
def test_bad_roles(llama, spec: str, message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        resolve_roles(spec, llama, "tidal")


def test_a_file_that_is_not_a_roles_file(tiny, tmp_path) -> None:
    path = tmp_path / "roles.json"
    path.write_text('{"something": 1}')
    with pytest.raises(ValueError, match="is not a sparsedecode head roles file"):
        resolve_roles(str(path), tiny, "tidal")


def test_learned_n_picks_the_shipped_roles_with_n_learned_units(qwen_1_5b) -> None:
    default = resolve_roles("learned", qwen_1_5b, "tidal")
    six = resolve_roles("learned:6", qwen_1_5b, "tidal")
    heads = qwen_1_5b.num_kv_heads
    assert default.num_retrieval - heads == 12 == default.source["target_retrieval"]  # the default since 12 won
    assert six.num_retrieval - heads == 6 == six.source["target_retrieval"]
    assert not torch.equal(six.retrieval, default.retrieval)
    assert torch.equal(resolve_roles(None, qwen_1_5b, "tidal").retrieval, default.retrieval)
    assert torch.equal(resolve_roles("learned:12", qwen_1_5b, "tidal").retrieval, default.retrieval)
    with pytest.raises(ValueError, match=r"shipped: learned:12, learned:6\).*calibrate --target-retrieval 7"):
        resolve_roles("learned:7", qwen_1_5b, "tidal")


@pytest.mark.parametrize("spec", ["learned:x", "learned:0", "learned:-3", "learned:"])
def test_learned_n_needs_a_positive_integer(qwen_1_5b, spec: str) -> None:
    with pytest.raises(ValueError, match="learned:N needs N.*positive integer"):
        resolve_roles(spec, qwen_1_5b, "tidal")


def test_learned_n_without_shipped_roles_names_calibrate(tiny) -> None:
    with pytest.raises(ValueError, match="no learned roles are shipped for this model; run `sparsedecode calibrate`"):
        resolve_roles("learned:12", tiny, "tidal")


def test_an_alternative_is_never_the_default(tiny, tmp_path, monkeypatch) -> None:
    roles = resolve_roles("random:5", tiny, "tidal")
    roles.source["target_retrieval"] = 5
    (tmp_path / "alternatives").mkdir()
    roles.save(tmp_path / "alternatives" / "tiny-learned5.json")
    monkeypatch.setattr(head_roles, "SHIPPED_DIR", tmp_path)
    assert torch.equal(resolve_roles("learned:5", tiny, "tidal").retrieval, roles.retrieval)
    assert torch.equal(resolve_roles(None, tiny, "tidal").retrieval, resolve_roles("tidal", tiny, "tidal").retrieval)
    with pytest.raises(ValueError, match="no learned roles are shipped"):
        resolve_roles("learned", tiny, "tidal")


def test_fingerprint_names_the_mask_not_its_source(qwen_1_5b, tmp_path) -> None:
    default = resolve_roles(None, qwen_1_5b, "tidal")
    path = tmp_path / "copy.json"
    default.save(path)
    assert resolve_roles(str(path), qwen_1_5b, "tidal").fingerprint() == default.fingerprint()
    six = resolve_roles("learned:6", qwen_1_5b, "tidal")
    assert six.fingerprint() != default.fingerprint() and six.fingerprint().startswith("8 of 56 retrieval units")
