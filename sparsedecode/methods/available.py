"""Imports every method module so that each registers itself under its name."""
from . import dense, lychee, quest, streaming  # noqa: F401
from . import lfps  # noqa: F401  (lfps, lychee+lfps)
