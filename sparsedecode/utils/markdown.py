"""GitHub markdown tables."""
from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "---:") -> str:
    """A table of `rows` of ready-made cells under `header`; `align` is the rule under every column but
    the first, which is left-aligned ('---:' right-aligns them, '---' leaves them to the renderer)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *[align] * (len(header) - 1)]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
