"""Decode-attention methods behind one interface (`base.DecodeMethod`), one module each, and their registry.

A new method is one module plus one line in `METHODS`; the contract test (tests/test_method_contract.py)
then runs it.
"""
from __future__ import annotations

from typing import Any

from ..models.config import ModelConfig
from .base import DecodeMethod
from .dense import Dense
from .lfps import LFPS, LycheeLFPS
from .lychee import Lychee, Tidal
from .quest import Quest
from .streaming import Streaming

METHODS: dict[str, type[DecodeMethod]] = {
    cls.name: cls for cls in (Dense, Lychee, Tidal, Quest, Streaming, LFPS, LycheeLFPS)
}


def method_class(name: str) -> type[DecodeMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def make_method(name: str, config: ModelConfig, **options: Any) -> DecodeMethod:
    return method_class(name)(config, **options)


__all__ = ["METHODS", "DecodeMethod", "make_method", "method_class"]
