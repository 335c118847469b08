"""Loaded before any test module: without CUDA, triton_cpu sets TRITON_INTERPRET=1 before anything imports
triton, so the Triton kernels' CPU cases run in the interpreter in this process (no fresh process per
kernel test file)."""
import triton_cpu  # noqa: F401
