"""Decode-attention kernels: the fused Triton kernel and its PyTorch reference."""
from .lfps_candidates import lfps_candidates_into
from .reference import sparse_decode_attention_ref
from .select_blocks import select_blocks
from .sparse_decode import sparse_decode_attention

__all__ = ["lfps_candidates_into", "select_blocks", "sparse_decode_attention",
           "sparse_decode_attention_ref"]
