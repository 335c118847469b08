"""Which KV heads of which layers are retrieval heads: the `[num_layers, num_kv_heads]` mask of
LycheeDecode, its presets and its JSON file format."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.config import ModelConfig
from ..utils.files import atomic_write_text

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "shipped"
_NOTHING_SHIPPED = "no learned roles are shipped for this model; run `sparsedecode calibrate`"


class RolesMismatchError(ValueError):
    """A roles file made for another model shape."""


@dataclass
class HeadRoles:
    """retrieval[layer, kv_head] is True for retrieval heads. Layer 0 is always all retrieval: the first
    selection of a step has to come from a full pass."""

    retrieval: torch.Tensor
    identity: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.retrieval = self.retrieval.to(torch.bool).cpu().clone()
        self.retrieval[0] = True

    @property
    def num_retrieval(self) -> int:
        return int(self.retrieval.sum())

    @property
    def density(self) -> float:
        return self.num_retrieval / self.retrieval.numel()

    def fingerprint(self) -> str:
        """Which heads retrieve, in a few words: equal for equal masks, whatever the file or preset."""
        digest = hashlib.sha256(self.retrieval.numpy().tobytes() + str(tuple(self.retrieval.shape)).encode())
        return f"{self.num_retrieval} of {self.retrieval.numel()} retrieval units, {digest.hexdigest()[:12]}"

    def check_fits(self, config: ModelConfig) -> None:
        expected = config.identity()
        if self.identity.get("config_hash") != expected["config_hash"] or tuple(self.retrieval.shape) != (
            config.num_layers,
            config.num_kv_heads,
        ):
            raise RolesMismatchError(
                f"head roles were made for {_describe(self.identity)} but the model is {_describe(expected)}; "
                "calibrate roles for this model (`sparsedecode calibrate`) or use a preset (all, tidal, random:N)"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.identity,
            "retrieval": self.retrieval.to(torch.int).tolist(),
            "num_retrieval": self.num_retrieval,
            "source": self.source,
        }

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash never leaves a half-written roles file."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> HeadRoles:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"head roles file {path} does not exist")
        try:
            data = json.loads(path.read_text())
            return cls(torch.tensor(data["retrieval"], dtype=torch.bool), data["model"], data.get("source", {}))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a sparsedecode head roles file ({e})") from e


def _describe(identity: dict[str, Any]) -> str:
    return (
        f"{identity.get('model_type')} with {identity.get('num_layers')} layers x "
        f"{identity.get('num_kv_heads')} KV heads (config {identity.get('config_hash')})"
    )


def tidal_roles(config: ModelConfig, reselect_layer: int | None = None) -> HeadRoles:
    """TidalDecode's layer-level scheme: layers 0-1 dense, layer 2 selects, one re-selection layer
    selects again; every other layer reuses. The paper picks the re-selection layer per model by a sweep;
    by default it is the middle layer (docs/notes/2026-11-30-structure.md says why). Models of fewer than
    6 layers get no re-selection layer by default."""
    n = config.num_layers
    reselect = reselect_layer if reselect_layer is not None else n // 2
    if reselect_layer is not None and not 2 < reselect < n:
        raise ValueError(f"tidal re-selection layer must lie in 3..{n - 1}, not {reselect}")
    mask = torch.zeros(n, config.num_kv_heads, dtype=torch.bool)
    mask[:3] = True  # layers 0-2 (fewer in a shallower model)
    reselects = 2 < reselect < n
    if reselects:
        mask[reselect] = True
    return HeadRoles(mask, config.identity(), {"preset": f"tidal:{reselect}" if reselects else "tidal"})


def random_roles(config: ModelConfig, count: int, seed: int = 0) -> HeadRoles:
    """`count` retrieval units drawn at random outside layer 0 (for tests), plus layer 0."""
    n, h = config.num_layers, config.num_kv_heads
    if not 0 <= count <= (n - 1) * h:
        raise ValueError(f"random:N needs 0 <= N <= {(n - 1) * h} for this model, not {count}")
    mask = torch.zeros(n, h, dtype=torch.bool)
    picks = torch.randperm((n - 1) * h, generator=torch.Generator().manual_seed(seed))[:count]
    mask[1:].view(-1)[picks] = True
    return HeadRoles(mask, config.identity(), {"preset": f"random:{count}", "seed": seed})


def shipped_roles_paths(config: ModelConfig) -> list[Path]:
    """Every roles file shipped for this model shape: the default (a top-level file of shipped/) first,
    then the alternatives (shipped/alternatives/)."""
    wanted = config.identity()["config_hash"]
    candidates = sorted(SHIPPED_DIR.glob("*.json")) + sorted(SHIPPED_DIR.glob("alternatives/*.json"))
    return [path for path in candidates if json.loads(path.read_text())["model"].get("config_hash") == wanted]


def shipped_roles_path(config: ModelConfig) -> Path | None:
    """The default learned roles shipped with the package for this model shape, if any."""
    return next((path for path in shipped_roles_paths(config) if path.parent == SHIPPED_DIR), None)


def learned_roles(config: ModelConfig, target_retrieval: int) -> HeadRoles:
    """The shipped roles for this model shape with `target_retrieval` learned retrieval units (`learned:N`)."""
    shipped = [HeadRoles.load(path) for path in shipped_roles_paths(config)]
    if not shipped:
        raise ValueError(_NOTHING_SHIPPED)
    for roles in shipped:
        if roles.source.get("target_retrieval") == target_retrieval:
            return roles
    counts = ", ".join(f"learned:{roles.source.get('target_retrieval')}" for roles in shipped)
    raise ValueError(
        f"no roles with {target_retrieval} learned retrieval units are shipped for this model (shipped: {counts}); "
        f"run `sparsedecode calibrate --target-retrieval {target_retrieval}`"
    )


def _learned_count(text: str) -> int:
    """N of `learned:N`."""
    value = text.split(":", 1)[1]
    if not value.isdecimal() or int(value) < 1:
        raise ValueError(
            f"learned:N needs N, the number of learned retrieval units, to be a positive integer, not {value!r}"
        )
    return int(value)


def resolve_roles(spec: str | Path | HeadRoles | None, config: ModelConfig, default: str) -> HeadRoles:
    """A HeadRoles from a preset name (`all`, `tidal`, `tidal:L`, `random:N`, `learned`, `learned:N`), a file
    path, or None (the shipped learned roles for this model, else the preset `default`). `learned` is the
    default shipped file; `learned:N` the shipped roles (default or alternative) with N learned retrieval units."""
    if isinstance(spec, HeadRoles):
        roles = spec
    elif spec is None:
        shipped = shipped_roles_path(config)
        roles = HeadRoles.load(shipped) if shipped else resolve_roles(default, config, default)
    else:
        text = str(spec)
        if text == "all":
            roles = HeadRoles(torch.ones(config.num_layers, config.num_kv_heads), config.identity(), {"preset": "all"})
        elif text == "tidal" or text.startswith("tidal:"):
            roles = tidal_roles(config, int(text.split(":")[1]) if ":" in text else None)
        elif text.startswith("random:"):
            roles = random_roles(config, int(text.split(":")[1]))
        elif text == "learned":
            shipped = shipped_roles_path(config)
            if shipped is None:
                raise ValueError(_NOTHING_SHIPPED)
            roles = HeadRoles.load(shipped)
        elif text.startswith("learned:"):
            roles = learned_roles(config, _learned_count(text))
        elif Path(text).suffix == ".json" or Path(text).exists():
            roles = HeadRoles.load(text)
        else:
            raise ValueError(
                f"unknown roles {text!r}: use all, tidal, tidal:L, random:N, learned, learned:N, or a roles .json file"
            )
    roles.check_fits(config)
    return roles
