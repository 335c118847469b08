"""Architectures of large models, for speed measurements with random weights (`random:llama-3.1-8b`)."""
from __future__ import annotations

from typing import Any

RANDOM_PREFIX = "random:"

SHAPES: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(  # for fast tests of the engine's logic
        model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-5,
        max_position_embeddings=4096, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "qwen3-8b": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
        max_position_embeddings=131072, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    "llama-3.1-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
}


def random_shape_config(spec: str) -> Any:
    """The transformers config of `random:<shape>`."""
    from transformers import AutoConfig

    name = spec[len(RANDOM_PREFIX):]
    if name not in SHAPES:
        raise ValueError(f"unknown random-weight shape {name!r}; available: {', '.join(RANDOM_PREFIX + s for s in SHAPES)}")
    fields = dict(SHAPES[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
