"""A normalised view of the Hugging Face configs of the architectures the engine runs."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


class UnsupportedModelError(ValueError):
    """The model's architecture or attention layout is not one the engine runs."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    hf_config: Any  # the transformers config: rope parameters come from it

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def identity(self) -> dict:
        """What a head-roles file records to refuse loading onto another model shape."""
        shape = {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
        }
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
        return {**shape, "config_hash": digest}

    def weight_bytes(self, bytes_per_element: int) -> int:
        """Bytes of the weights a decode step reads (embedding row reads are negligible)."""
        attn = self.hidden_size * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        attn += self.num_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attn + mlp + 2 * self.hidden_size
        lm_head = self.vocab_size * self.hidden_size
        return (self.num_layers * per_layer + lm_head + self.hidden_size) * bytes_per_element

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * bytes_per_element


def model_config_from_hf(hf_config: Any) -> ModelConfig:
    """Check that the engine supports `hf_config` and normalise it."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (full attention, GQA)"
        )
    layer_types = getattr(hf_config, "layer_types", None) or []
    uses_sliding = getattr(hf_config, "use_sliding_window", model_type == "mistral")
    window = getattr(hf_config, "sliding_window", None)
    if any(t != "full_attention" for t in layer_types) or (uses_sliding and window):
        raise UnsupportedModelError(
            f"this {model_type} model has sliding-window attention layers (sliding_window={window}); "
            "sparsedecode supports full-attention models only"
        )
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return ModelConfig(
        model_type=model_type,
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=hf_config.vocab_size,
        rms_norm_eps=hf_config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(getattr(hf_config, "attention_bias", False)),
        qk_norm=model_type == "qwen3",
        max_position_embeddings=hf_config.max_position_embeddings,
        hf_config=hf_config,
    )
