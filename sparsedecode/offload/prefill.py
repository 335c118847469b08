"""Layer-major prefill: the whole prompt through one layer at a time, so the GPU holds one layer's K/V.

Chunk-major prefill (`Transformer.prefill_chunk`) needs every layer's K/V of the prefix on the device.
Here the hidden states of all prompt tokens stay on the device instead (hidden_size values a token
against 2 x layers x kv_heads x head_dim of K/V), each layer's K/V is built chunk by chunk in a device
buffer, then copied to host memory on a side stream while the next layer computes (two buffers take
turns). Each chunk meets exactly the keys it meets in chunk-major order, with the same operations, so
the cache and the returned hidden state are the chunk-major ones.
"""
from __future__ import annotations

import torch

from ..models.transformer import Transformer
from .cache import OffloadedKVCache


@torch.inference_mode()
def prefill_layer_major(
    model: Transformer, token_ids: torch.Tensor, cache: OffloadedKVCache, batch_index: int, chunk: int
) -> torch.Tensor:
    """Prefill sequence `batch_index` with `token_ids` [n] (from position 0); returns the final,
    normalised hidden state of the last token [hidden]."""
    n, device, dtype = token_ids.shape[0], token_ids.device, cache.k.dtype
    on_gpu = device.type == "cuda"
    side = torch.cuda.Stream(device) if on_gpu else None
    shape = (cache.num_kv_heads, n, cache.head_dim)
    buffers = [
        (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device),
         torch.cuda.Event() if on_gpu else None)
        for _ in range(2 if on_gpu else 1)
    ]
    x = model.embed_tokens(token_ids)
    for i, layer in enumerate(model.layers):
        k_all, v_all, stored = buffers[i % len(buffers)]
        if i >= len(buffers) and stored is not None:
            torch.cuda.current_stream(device).wait_event(stored)  # its copy to host two layers ago is done
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            cos, sin = model.rope(torch.arange(start, end, device=device), dtype)

            def store_kv(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                k_all[:, start:end], v_all[:, start:end] = k, v
                return k_all[:, :end], v_all[:, :end]

            x[start:end] = layer.prefill(x[start:end], cos, sin, store_kv)
        if side is None:
            cache.write(i, batch_index, 0, k_all, v_all)
            continue
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            cache.write(i, batch_index, 0, k_all, v_all)
            stored.record(side)
    if side is not None:
        side.synchronize()
    return model.norm(x[-1])
