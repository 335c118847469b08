"""Load a model for the engine: a registry name, a GGUF file, a Hugging Face folder, or an architecture
shape with random weights (speed does not depend on weight values)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, model_config_from_hf
from .shapes import RANDOM_PREFIX, random_shape_config
from .transformer import Transformer


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


def _hf_location(path: Path) -> tuple[str, dict[str, str]]:
    """(folder, extra from_pretrained kwargs) for a GGUF file or a model folder."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a GGUF file; give a .gguf file or a Hugging Face model folder")
        return str(path.parent), {"gguf_file": path.name}
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    return str(path), {}


def load_model(spec: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        config = model_config_from_hf(random_shape_config(spec))
        with torch.device(device):
            model = Transformer(config).to(dtype)
        with torch.no_grad():
            for p in model.parameters():  # small, varied weights keep activations finite
                p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        return LoadedModel(model.eval().requires_grad_(False), config, None, spec)

    from .registry import resolve_model

    folder, kwargs = _hf_location(Path(resolve_model(spec)))
    config = model_config_from_hf(AutoConfig.from_pretrained(folder, **kwargs))  # refuse before loading weights
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    model.rope = type(model.rope)(config).to(device)  # buffers computed, not loaded
    model.layer_index = torch.arange(config.num_layers, device=device)
    model.load_hf_state_dict(hf_model.state_dict())
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    del hf_model
    return LoadedModel(model.eval().requires_grad_(False), config, tokenizer, spec)
