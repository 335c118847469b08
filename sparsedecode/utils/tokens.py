"""Token counts as people write them: 4096, 4k (4096), 128K, 1m (1048576), and back."""
from __future__ import annotations

import re

_COUNT = re.compile(r"(\d+)([km]?)", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20}


def parse_token_count(text: str) -> int:
    """A positive token count from 4096, 4k (4096), 128K or 1m (1048576); ValueError otherwise."""
    match = _COUNT.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"bad token count {text!r}: use a positive count such as 4096, 4k or 1m")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def token_count_label(tokens: int) -> str:
    """4096 -> '4K'; a count that is not a whole number of K stays as it is."""
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)
