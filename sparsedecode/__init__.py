"""sparsedecode: fast long-context decoding that reads only the part of the KV cache that matters."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import LLM, Generation, SamplingParams
    from .roles.head_roles import HeadRoles

__all__ = ["LLM", "Generation", "HeadRoles", "SamplingParams"]
__version__ = "0.1.0"

# Imported on first use: `sparsedecode --help` (which imports this package) must not import torch.
_LAZY = {"LLM": ".engine", "Generation": ".engine", "SamplingParams": ".engine", "HeadRoles": ".roles.head_roles"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
