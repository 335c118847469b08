"""The README's Python examples run as written, on the CI model: each ```python block of the sections below, with
the 1.5B model swapped for smollm2-135m and its token counts cut to 8 so that a CPU runs them in seconds."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real model weights

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ["## Python API", "### Continuous batching: `llm.engine`"]


def example(section: str) -> str:
    """The first ```python block after the heading `section`."""
    text = README.read_text()
    start = text.index(section + "\n")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, f"no python block under {section!r}"
    return block.group(1)


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_example_runs(section: str) -> None:
    code = example(section)
    assert '"qwen2.5-coder-1.5b"' in code  # the swap below must change something
    code = code.replace('"qwen2.5-coder-1.5b"', '"smollm2-135m", device="cpu"')
    code = re.sub(r"(max_new_tokens|max_tokens)=\d+", r"\1=8", code)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md, {section}", "exec"), {})
    assert out.getvalue().strip(), "the example printed nothing"
