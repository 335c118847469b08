"""Triton kernels on CPU tensors for the tests: the interpreter (patched), or a fresh process.

Import this module before anything imports triton: without CUDA it sets TRITON_INTERPRET=1. Triton
picks interpreter or compiler when it decorates a function, so if another test module imported triton
first, the interpreter cannot run in this process (`interpreted(kernel)` is False) and the CPU cases
run in a fresh process instead (`run_in_fresh_process`).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def interpreted(kernel) -> bool:
    """Whether a @triton.jit function was decorated for the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def fix_interpreter() -> None:
    """Two bugs of triton 3.6's interpreter, both fixed upstream, patched for these tests only:
    loop bounds taken from 1-element arrays with int(), an error since numpy 2.4 (triton#9171), and
    tl.dot multiplying the raw uint16 bits of bf16 operands."""
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "sparsedecode_fixed", False):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    create_dot = interpreter.InterpreterBuilder.create_dot

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter._patch_lang_tensor = patched_tensor
    interpreter.InterpreterBuilder.create_dot = patched_dot
    interpreter.sparsedecode_fixed = True


def devices(interpret: bool) -> list:
    """pytest params "cpu" (interpreter, when this process has it) and "cuda" (when there is a GPU)."""
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not interpret, reason="needs TRITON_INTERPRET=1 before triton")),
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
    ]


def run_in_fresh_process(test_file: str, timeout: int = 900) -> None:
    """Run a test file in a new interpreter with TRITON_INTERPRET=1; fail with its output if it fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file], env=env,
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
