"""Head-role presets, the roles file format and its errors."""
from __future__ import annotations

import json

import pytest
import torch

from sparsedecode.models.config import model_config_from_hf
from sparsedecode.models.shapes import random_shape_config
from sparsedecode.roles.head_roles import HeadRoles, RolesMismatchError, resolve_roles


@pytest.fixture(scope="module")
def llama():
    return model_config_from_hf(random_shape_config("random:llama-3.1-8b"))


@pytest.fixture(scope="module")
def tiny():
    return model_config_from_hf(random_shape_config("random:tiny-llama"))


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
