"""Load a model for the engine: a registry name, a GGUF file, a Hugging Face folder, or an architecture
shape with random weights (speed does not depend on weight values).

Registry models are converted once. transformers dequantises a GGUF slowly (most of the half minute a
135M model took to load on a CPU), so the loader keeps, beside the registry's GGUF, the converted weights
(`<stem>.<dtype>.safetensors`) and the transformers config and tokenizer (`<stem>.hf/`). Both are written
atomically and keyed by the GGUF's sha256 (the weights also by the dtype); a cache whose key does not match
is ignored and rebuilt.

Over several GPUs (`TensorParallel`) each process loads only its slice of every weight: random weights are
made per slice on its device, and the converted cache is read slice by slice.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..utils.files import atomic_path
from .config import ModelConfig, model_config_from_hf
from .parallel import TensorParallel, shard_weight
from .shapes import RANDOM_PREFIX, random_shape_config
from .transformer import Transformer
from .weights import Weight, from_transformers, weight_names

#: part of every cache key: bump it when the converted form changes (e.g. Transformer's parameter layout)
CONVERTED_FORMAT = "1"
KEY_FILE = "sparsedecode-key.json"


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    tokenizer: Any  # a transformers tokenizer, or None for random-weight shapes
    source: str


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _registry_names() -> dict:
    from .registry import MODELS

    return MODELS


def model_files(spec: str | Path) -> tuple[str, str | None]:
    """(folder, GGUF file name or None) where transformers finds the config and tokenizer of `spec`: a
    registry model's converted folder (written from its GGUF, pulled first, on first use), a GGUF file's
    folder, or a Hugging Face model folder."""
    spec = str(spec)
    if spec in _registry_names():
        return str(_converted_folder(spec)), None
    from .registry import resolve_model

    path = resolve_model(spec)
    return (str(path.parent), path.name) if path.is_file() else (str(path), None)


def load_config(spec: str | Path) -> ModelConfig:
    """The engine's config of `spec`, without its weights; UnsupportedModelError for an architecture the
    engine does not run."""
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        return model_config_from_hf(random_shape_config(spec))
    return model_config_from_hf(_auto_config(*_stamped(model_files(spec))))


def load_tokenizer(spec: str | Path) -> Any:
    """The transformers tokenizer of `spec`; None for random-weight shapes."""
    spec = str(spec)
    return None if spec.startswith(RANDOM_PREFIX) else _auto_tokenizer(*_stamped(model_files(spec)))


def _stamped(files: tuple[str, str | None]) -> tuple[str, str | None, int]:
    folder, gguf_file = files
    return folder, gguf_file, os.stat(Path(folder, gguf_file or "")).st_mtime_ns


# Memoised: a command reads the config and tokenizer to check its arguments before it loads the model, and
# from a GGUF each read parses the whole file (seconds). The modification time is in the key, so a file
# written anew is read anew.
@functools.lru_cache(maxsize=4)
def _auto_config(folder: str, gguf_file: str | None, mtime_ns: int) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)


@functools.lru_cache(maxsize=4)
def _auto_tokenizer(folder: str, gguf_file: str | None, mtime_ns: int) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def load_model(spec: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               tp: TensorParallel = TensorParallel()) -> LoadedModel:
    """The model `spec` on `device`; with `tp`, this GPU's slice of it."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    spec = str(spec)
    config = load_config(spec)  # refuses an unsupported architecture before any weight is read
    if spec.startswith(RANDOM_PREFIX):
        if tp.sharded:  # only this GPU's slice, made in the dtype on its device: no whole or float32 copy
            with torch.device("meta"):
                model = Transformer(config, tp).to(dtype)
            model = _finish(model.to_empty(device=device), config, device)
        else:  # as it always was: a seed gives the same weights as before
            with torch.device(device):
                model = Transformer(config).to(dtype)
        with torch.no_grad():
            for p in model.parameters():  # small, varied weights keep activations finite
                p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        return LoadedModel(model.eval().requires_grad_(False), config, None, spec)

    tokenizer = load_tokenizer(spec)
    if spec in _registry_names():
        model = _registry_weights(spec, config, device, dtype, tp)
    else:
        model = _from_transformers(*model_files(spec), config, device, dtype, tp)
    return LoadedModel(model, config, tokenizer, spec)


def _from_transformers(folder: str, gguf_file: str | None, config: ModelConfig, device: torch.device,
                       dtype: torch.dtype, tp: TensorParallel = TensorParallel()) -> Transformer:
    """The slow path: transformers reads (for a GGUF: dequantises) the weights, which we then take over."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, gguf_file=gguf_file)
    return _assembled(from_transformers(hf_model.state_dict(), config).__getitem__, config, device, tp)


def _assembled(get: Callable[[str], Any], config: ModelConfig, device: torch.device,
               tp: TensorParallel) -> Transformer:
    """The model (this GPU's slice, with `tp`) from `get(name)`: the whole weight of each of our parameter
    names (a tensor, or a safetensors slice), the tied output head left out."""
    with torch.device("meta"):
        model = Transformer(config, tp)
    state = {name: shard_weight(w, get(name), config, tp).to(device) for name, w in _stored_weights(config).items()}
    # assign: the loaded tensors become the parameters (no second copy of the weights in memory)
    model.load_state_dict(state, strict=False, assign=True)
    return _finish(model, config, device)


def _finish(model: Transformer, config: ModelConfig, device: torch.device) -> Transformer:
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope = type(model.rope)(config).to(device)  # buffers computed, not loaded
    return model.eval().requires_grad_(False)


# -- the converted cache of registry models --------------------------------------------------------


def _converted_folder(name: str) -> Path:
    """`name`'s transformers config and tokenizer, written from its GGUF unless a folder with its key is there."""
    from .registry import converted_folder, get_spec, model_lock, pull_model

    gguf = pull_model(name)
    folder = converted_folder(name)
    key = {"gguf_sha256": get_spec(name).sha256, "format": CONVERTED_FORMAT}
    if _folder_key(folder) == key:
        return folder
    with model_lock(name):  # one writer; a process that waited here finds the folder written
        if _folder_key(folder) == key:
            return folder
        shutil.rmtree(folder, ignore_errors=True)  # a folder can only be renamed over a missing one
        with atomic_path(folder) as tmp:
            stamped = _stamped((str(gguf.parent), gguf.name))
            _auto_config(*stamped).save_pretrained(tmp)
            _auto_tokenizer(*stamped).save_pretrained(tmp)
            (tmp / KEY_FILE).write_text(json.dumps(key))
    return folder


def _folder_key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None


def _registry_weights(name: str, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                      tp: TensorParallel = TensorParallel()) -> Transformer:
    """`name`'s weights from the converted cache when its key matches, else converted from the GGUF and cached
    (whole, in host memory when this process holds only a slice)."""
    from .registry import converted_weights, get_spec, model_lock, model_path

    dtype_name = str(dtype).removeprefix("torch.")
    path = converted_weights(name, dtype_name)
    key = {"gguf_sha256": get_spec(name).sha256, "dtype": dtype_name, "format": CONVERTED_FORMAT}
    with model_lock(name):
        model = _load_converted(path, key, config, device, tp)
        if model is None:
            gguf = model_path(name)
            model = _from_transformers(str(gguf.parent), gguf.name, config,
                                       torch.device("cpu") if tp.sharded else device, dtype)
            _save_converted(model, config, path, key)
            if tp.sharded:
                model = _assembled(model.state_dict().__getitem__, config, device, tp)
    return model


def _load_converted(path: Path, key: dict[str, str], config: ModelConfig, device: torch.device,
                    tp: TensorParallel = TensorParallel()) -> Transformer | None:
    """The cached weights at `path` (this GPU's slices, with `tp`), or None when there are none, or none with
    this key and layout."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt", device=str(device)) as f:
            if f.metadata() != key or set(f.keys()) != set(_stored_weights(config)):
                return None
            return _assembled(f.get_slice, config, device, tp)
    except (OSError, SafetensorError):
        return None


def _stored_weights(config: ModelConfig) -> dict[str, Weight]:
    """Our parameter names, with their table rows, as the cache stores them."""
    return {name: w for name, w in weight_names(config) if name not in _tied_names(config)}


def _tied_names(config: ModelConfig) -> set[str]:
    """Parameters the cache leaves out: the output head when it is the embedding (safetensors refuses
    shared tensors)."""
    return {"lm_head.weight"} if config.tie_word_embeddings else set()


def _save_converted(model: Transformer, config: ModelConfig, path: Path, key: dict[str, str]) -> None:
    from safetensors.torch import save_file

    state = {k: v for k, v in model.state_dict().items() if k not in _tied_names(config)}
    try:
        with atomic_path(path) as tmp:
            save_file(state, tmp, metadata=key)
            tmp.chmod(0o644)  # safetensors writes it private; the cache's other files are readable by all
    except OSError as e:  # e.g. a full disk: the model is loaded all the same, only the next load is slow
        warnings.warn(f"could not cache the converted weights at {path}: {e}", stacklevel=2)
