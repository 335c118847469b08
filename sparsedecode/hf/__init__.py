"""Sparse decoding inside Hugging Face transformers: `with sparse_decoding(model, method=...)`, a plain
`model.generate` decodes with a sparsedecode method (docs/transformers.md)."""
from .cache import DecodeStats, SparseCache, UnsupportedSettingError
from .decoding import SparseDecoding, sparse_decoding

__all__ = ["DecodeStats", "SparseCache", "SparseDecoding", "UnsupportedSettingError", "sparse_decoding"]
