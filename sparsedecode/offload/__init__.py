"""KV cache in host memory for contexts larger than the GPU."""
