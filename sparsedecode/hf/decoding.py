"""`sparse_decoding(model, method, **options)`: inside the block, `model.generate` decodes with a
sparsedecode method; outside it, the model is as it was.

On entry the model's attention implementation becomes `attention.ATTN_IMPLEMENTATION` (through
transformers' `set_attn_implementation`; restored on exit), and a forward pre-hook (PyTorch's
`register_forward_pre_hook`, the mechanism kvpress presses use) watches the model's forward passes.
`generate` gives the prefill forward the empty `DynamicCache` it made; the hook puts a new `SparseCache`
in its place (generate then carries on with the cache the forward returns), and hands it down to the
attention function under `attention.CACHE_KWARG`. A plain `model.generate(**inputs)` thus needs no
extra argument, and every generate call gets a cache of its own batch.

A forward pass without a cache, or continuing a cache made outside the block, runs the model's own
attention. Settings sparse decoding cannot honour raise `UnsupportedSettingError` naming them: beam
search and chunked prefill (from the cache, when generate first needs them), `use_cache=False`, a cache
passed to `generate`, another `cache_implementation`, a model spread over several devices. Assisted and
speculative decoding meet transformers' own refusal of a cache that cannot be cropped; sliding-window
models raise `UnsupportedModelError` on entry.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from ..methods import make_method
from ..models.config import model_config_from_hf
from .attention import ATTN_IMPLEMENTATION, CACHE_KWARG
from .cache import DecodeStats, SparseCache, UnsupportedSettingError

#: the pool's block size for methods without a `block_size` option (the engine's default)
DEFAULT_BLOCK_SIZE = 64
#: the keywords a cache comes under (`past_key_values`, its older name, is still accepted by transformers)
CACHE_NAMES = ("cache", "past_key_values")


class SparseDecoding:
    """The context manager `sparse_decoding` returns; after a generate call, `stats()` and
    `kv_fraction_read` describe its decode steps."""

    def __init__(self, model: PreTrainedModel, method: str = "lychee", max_context: int | None = None,
                 **options: Any) -> None:
        self.model = model
        self.config = model_config_from_hf(model.config)  # refuses other architectures and sliding windows
        self.max_context = max_context or self.config.max_position_embeddings
        self.method_name, self.options = method, options
        # The method as configured (options, budget and roles checked now); each generate call plans its own.
        self.method = make_method(method, self.config, **options)
        self.block_size = self.method.options.get("block_size", DEFAULT_BLOCK_SIZE)
        self.cache: SparseCache | None = None  # the last generate call's
        self._made: weakref.WeakSet[SparseCache] = weakref.WeakSet()
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._saved_implementation: str | None = None

    def __enter__(self) -> SparseDecoding:
        devices = {p.device for p in self.model.parameters()}
        if len(devices) > 1:
            raise UnsupportedSettingError(f"a model spread over several devices ({sorted(map(str, devices))}): "
                                          "sparse decoding keeps every layer's KV in one pool on one device")
        if self.model.config._attn_implementation == ATTN_IMPLEMENTATION:
            raise RuntimeError("the model is already inside a sparse_decoding block")
        self._saved_implementation = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self._hook = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hook.remove()
        self.model.set_attn_implementation(self._saved_implementation)
        for cache in self._made:
            cache.active = False

    def _before_forward(self, module: torch.nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if kwargs.get("use_cache") is False:
            raise UnsupportedSettingError("use_cache=False: sparse decoding decodes from the KV cache")
        name = next((n for n in CACHE_NAMES if kwargs.get(n) is not None), None)
        if name is None:
            return None  # a forward pass without a cache: the model's own attention
        cache = kwargs[name]
        if getattr(cache, "_is_user_defined", False):  # generate marks the caches it was given
            raise UnsupportedSettingError("a cache given to generate (cache=, past_key_values=): inside "
                                          "sparse_decoding every generate call makes a SparseCache of its own")
        if not isinstance(cache, SparseCache):
            if cache.get_seq_length():
                return None  # continues a cache made outside the block: the model's own attention
            # generate's prefill: the empty DynamicCache it made gives way to a SparseCache
            if type(cache) is not DynamicCache or cache.offloading:
                raise UnsupportedSettingError(f"cache_implementation giving a {type(cache).__name__}: inside "
                                              "sparse_decoding generate decodes through a SparseCache")
            cache = SparseCache(self.config, make_method(self.method_name, self.config, **self.options),
                                self.block_size, self.max_context, kwargs.get("attention_mask"))
            self.cache = cache
            self._made.add(cache)
            kwargs[name] = cache
        elif cache.filled:
            # A decode step attends through the pool and never reads a mask: without one transformers makes
            # none, instead of building it and reading the padding back to the host to decide (a sync per step).
            kwargs["attention_mask"] = None
        kwargs[CACHE_KWARG] = cache
        return args, kwargs

    def stats(self) -> DecodeStats:
        """The decode steps of the last generate call in this block."""
        if self.cache is None:
            raise RuntimeError("no generate call has run inside this sparse_decoding block")
        return self.cache.stats()

    @property
    def kv_fraction_read(self) -> float:
        """K/V rows the last generate call's decode steps read, over what dense attention reads."""
        return self.stats().kv_fraction_read


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword `model`'s forward takes its cache under: `cache` in newer transformers, `past_key_values`
    before (where `cache=` falls into the forward's extra arguments and the call runs without it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sparse_decoding(model: PreTrainedModel, method: str = "lychee", max_context: int | None = None,
                    **options: Any) -> SparseDecoding:
    """Decode with `method` (a name of `sparsedecode.methods.METHODS`, with its options: `budget`, `roles`,
    ...) inside the `with` block::

        with sparse_decoding(model, method="lychee", budget=1024) as sd:
            out = model.generate(**inputs, max_new_tokens=256)
        print(sd.kv_fraction_read)

    `model`: a transformers Llama, Qwen2, Qwen3 or Mistral causal LM (full attention), on one device, in
    any dtype. Roles left unset are the learned ones shipped for the model's shape, if any.
    `max_context`: the most tokens of a sequence, prompt and output (default: the model's
    `max_position_embeddings`); the method's per-sequence state is sized by it, as in `LLM`.
    """
    return SparseDecoding(model, method, max_context, **options)
