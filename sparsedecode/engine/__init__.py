"""The engine: KV cache, prefill, CUDA-graph decode, sampling, and the LLM API."""
