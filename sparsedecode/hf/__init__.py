"""Sparse decoding inside Hugging Face transformers: `with sparse_decoding(model, method=...)`, a plain
`model.generate` decodes with a sparsedecode method (docs/transformers.md)."""
from .cache import DecodeStats, SparseCache, UnsupportedSettingError
from .decoding import SparseDecoding, cache_keyword, sparse_decoding

__all__ = ["DecodeStats", "SparseCache", "SparseDecoding", "UnsupportedSettingError", "cache_keyword",
           "sparse_decoding"]
