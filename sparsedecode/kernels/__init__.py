"""Decode-step kernels (Triton): attention, KV writes, block selection and few-row linear layers; each module
names the PyTorch reference it computes."""
from .gemv import gemv
from .lfps_candidates import lfps_candidates_into
from .pdl import pdl_enabled
from .prefill_attention import paged_prefill_attention
from .quest_pages import quest_page_scores
from .reference import (add_rmsnorm_gemv_ref, gather_blocks, gemv_ref, paged_prefill_attention_ref,
                        quest_page_scores_ref, silu_mul_gemv_ref, sparse_decode_attention_ref, store_kv_ref)
from .select_blocks import select_blocks
from .sparse_decode import sparse_decode_attention
from .store_kv import store_kv

__all__ = ["add_rmsnorm_gemv_ref", "gather_blocks", "gemv", "gemv_ref", "lfps_candidates_into",
           "paged_prefill_attention", "paged_prefill_attention_ref", "pdl_enabled",
           "quest_page_scores", "quest_page_scores_ref", "select_blocks",
           "silu_mul_gemv_ref", "sparse_decode_attention", "sparse_decode_attention_ref", "store_kv", "store_kv_ref"]
