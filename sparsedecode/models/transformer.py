"""One decoder for Llama, Qwen2, Qwen3 and Mistral. It owns no KV cache: each layer's attention is a callable
the caller passes (`AttentionFn`), which stores the new K/V wherever its cache lives and attends.

The arithmetic follows transformers' modeling code operation for operation (RMSNorm in float32, RoPE
tables cast to the model dtype) so that greedy decoding matches `generate` token for token.

Over several GPUs (`parallel.TensorParallel`) each holds its KV heads' share of attention, its share of the
MLP and of the vocabulary; the residual stream is whole on every GPU.
"""
from __future__ import annotations

import importlib

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from ..kernels import pdl_enabled
from ..kernels.gemv import MAX_ROWS, add_rmsnorm_linear_rows, linear_rows, silu_mul_linear_rows
from . import DECODE_COMPILE_MODES
from .config import ModelConfig
from .parallel import TensorParallel, VocabParallelEmbedding, check_tensor_parallel

#: attention(layer, q [n, Hq, D], k [n, Hkv, D], v [n, Hkv, D]) -> [n, Hq, D], for the n tokens of one call
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary positions, from transformers' own rope initialisation (llama3 scaling etc.)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
        hf_rope_cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
        hf_rope = hf_rope_cls(config.hf_config)
        self.register_buffer("inv_freq", hf_rope.inv_freq.float(), persistent=False)
        self.attention_scaling = float(hf_rope.attention_scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, head_dim] of `positions` [n]: computed, or gathered from a `table` of this dtype."""
        if table is not None:
            cos_sin = table[positions]  # one launch where computing them takes about eight
            return cos_sin[:, 0], cos_sin[:, 1]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def table(self, num_positions: int, dtype: torch.dtype) -> torch.Tensor:
        """cos and sin of positions [0, num_positions) [num_positions, 2, head_dim], the bits `forward`
        computes, for `forward(..., table=)`."""
        cos, sin = self(torch.arange(num_positions, device=self.inv_freq.device), dtype)
        return torch.stack((cos, sin), dim=1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last q.shape[1] positions over all k.shape[1] keys (bottom-right aligned).
    q: [Hq, n, D]; k, v: [Hkv, end, D] -> [Hq, n, D]. No [n, end] mask is built on the GPU, so the
    chunk's memory does not grow with the context."""
    mask = causal_lower_right(q.shape[1], k.shape[1])
    if q.is_cuda:
        # The fused kernels behind the lower-right mask take equal head counts: expand the KV heads.
        group = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]


def linear(layer: nn.Linear, x: torch.Tensor, linears: str) -> torch.Tensor:
    """`layer(x)`; with `linears` "gemv" or "gemv-fused" (models.DECODE_LINEARS), x of at most
    `kernels.gemv.MAX_ROWS` rows (a decode step) goes through the few-row Triton kernel instead of cuBLAS."""
    if linears != "torch" and x.shape[0] <= MAX_ROWS:
        return linear_rows(x, layer.weight, layer.bias, dependent_launch(x))
    return layer(x)


def rope_in_qkv(config: ModelConfig, linears: str, rows: int) -> bool:
    """Whether a layer's qkv projection also rotates q and k (`kernels.gemv.add_rmsnorm_linear_rows`): with
    `linears` "gemv-fused" for the rows of a decode step, where no q/k norm comes between."""
    return linears == "gemv-fused" and rows <= MAX_ROWS and not config.qk_norm and config.head_dim % 32 == 0


def dependent_launch(x: torch.Tensor) -> bool:
    """Whether a gemv op on x's device launches dependently (`kernels.pdl`): outside torch.compile only."""
    return not torch.compiler.is_compiling() and pdl_enabled(x.device)


def norm_linear(norm: RMSNorm, layer: nn.Linear, parts: tuple[torch.Tensor, ...],
                linears: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer(norm(s))) for the residual stream s = the sum of `parts` (two or three); with `linears`
    "gemv-fused", one kernel for the rows of a decode step (`kernels.gemv.add_rmsnorm_linear_rows`)."""
    if linears == "gemv-fused" and parts[0].shape[0] <= MAX_ROWS:
        return add_rmsnorm_linear_rows(parts[0], parts[1], parts[2] if len(parts) > 2 else None, norm.weight,
                                       norm.eps, layer.weight, layer.bias, dependent_launch(parts[0]))
    total = sum(parts[1:], parts[0])
    return total, linear(layer, norm(total), linears)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.config, self.tp = config, tp
        # this GPU's heads and MLP columns
        self.num_heads, self.num_kv_heads = (len(tp.part(n)) for n in (config.num_heads, config.num_kv_heads))
        intermediate = len(tp.part(config.intermediate_size))
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * config.head_dim, config.hidden_size, bias=config.o_bias)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, config.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def attention_input(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The residual stream x: [tokens, hidden] -> rotated q [tokens, Hq, D], k and v [tokens, Hkv, D]
        of the normalised x."""
        return self.rotated_heads(self.qkv_proj(self.input_layernorm(x)), cos, sin)

    def rotated_heads(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """qkv_proj's output [tokens, (Hq + 2 Hkv) D] -> q, k (normalised where the model does, rotated) and v."""
        c, heads, kv_heads = self.config, self.num_heads, self.num_kv_heads
        qkv = qkv.view(-1, heads + 2 * kv_heads, c.head_dim)
        v = qkv[:, heads + kv_heads:]
        if c.qk_norm:
            q, k = self.q_norm(qkv[:, :heads]), self.k_norm(qkv[:, heads: heads + kv_heads])
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
        qk = apply_rope(qkv[:, : heads + kv_heads], cos, sin)  # q and k in one kernel when compiled
        return qk[:, :heads], qk[:, heads:], v

    def attention_output(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual stream after this layer, from its attention output attn: [tokens, Hq, D]."""
        o, m = self.residual_updates(x, attn)
        return x + o + m

    def residual_updates(self, x: torch.Tensor, attn: torch.Tensor,
                         linears: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """What this layer adds to its input x: the attention's projection o, and the MLP's output m of x + o
        (from attn: [tokens, Hq, D], this GPU's heads; each projection is a partial sum over the GPUs). The
        layer's output is (x + o) + m. `linears`: see `linear`."""
        o = self.tp.all_reduce(linear(self.o_proj, attn.reshape(x.shape[0], -1), linears))
        _, gate_up = norm_linear(self.post_attention_layernorm, self.gate_up_proj, (x, o), linears)
        return o, self.tp.all_reduce(self.mlp_output(gate_up, linears))

    def residual_and_qkv(self, x: torch.Tensor, o: torch.Tensor, m: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, linears: str = "torch") -> tuple[torch.Tensor, ...]:
        """This layer's input (x + o) + m, from the previous layer's input x and its `residual_updates`, and
        the `attention_input` of it: (input, q, k, v). With `linears` "gemv-fused" (`rope_in_qkv`) one kernel
        sums, normalises, projects and rotates."""
        c, heads, kv_heads = self.config, self.num_heads, self.num_kv_heads
        if rope_in_qkv(c, linears, x.shape[0]):
            x, qkv = add_rmsnorm_linear_rows(x, o, m, self.input_layernorm.weight, self.input_layernorm.eps,
                                             self.qkv_proj.weight, self.qkv_proj.bias, dependent_launch(x), cos, sin,
                                             (heads + kv_heads) * c.head_dim)
            qkv = qkv.view(-1, heads + 2 * kv_heads, c.head_dim)
            return x, qkv[:, :heads], qkv[:, heads: heads + kv_heads], qkv[:, heads + kv_heads:]
        x, qkv = norm_linear(self.input_layernorm, self.qkv_proj, (x, o, m), linears)
        return (x, *self.rotated_heads(qkv, cos, sin))

    def mlp_output(self, gate_up: torch.Tensor, linears: str = "torch") -> torch.Tensor:
        """down_proj(silu(gate) * up) of gate_up_proj's output [gate | up]."""
        if linears == "gemv-fused" and gate_up.shape[0] <= MAX_ROWS:
            return silu_mul_linear_rows(gate_up, self.down_proj.weight, self.down_proj.bias, dependent_launch(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return linear(self.down_proj, F.silu(gate) * up, linears)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        check_tensor_parallel(config, tp.world_size)
        self.config, self.tp = config, tp
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp) if tp.sharded
                             else nn.Embedding(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, tp) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, tp.vocab_rows(config.vocab_size), bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config)
        # What a fixed-shape (decode) forward runs around each layer's attention; compile_decode swaps in
        # compiled versions.
        self.residual_and_qkv = DecoderLayer.residual_and_qkv
        self.residual_updates = DecoderLayer.residual_updates
        self.decode_linear = "torch"  # what runs the linear layers of fused forwards and logits (DECODE_LINEARS)

    def compile_decode(self, mode: str = "default") -> None:
        """Fuse the element-wise work around each layer's GEMMs in the decode step (norms, RoPE, SiLU,
        residual adds) with torch.compile: eager, it is dozens of small kernels per layer, each costing a
        launch even inside a CUDA graph. One compiled graph serves every layer (the layer's weights are its
        inputs); the attention itself stays the caller's. `mode` is one of DECODE_COMPILE_MODES:
        "max-autotune-no-cudagraphs" lets Inductor time Triton GEMM templates against cuBLAS for each GEMM
        (longer compiles; the caller captures CUDA graphs itself, so no mode that adds Inductor's)."""
        if mode not in DECODE_COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r} is not one of {', '.join(DECODE_COMPILE_MODES)} (the engine "
                             "captures its decode steps in CUDA graphs itself)")
        # Inductor's kernels join ours in dependent launches (kernels.pdl) where those are on.
        options = {**torch._inductor.list_mode_options(mode),
                   "triton.enable_pdl": pdl_enabled(self.embed_tokens.weight.device)}
        self.residual_and_qkv = torch.compile(DecoderLayer.residual_and_qkv, fullgraph=True, options=options)
        self.residual_updates = torch.compile(DecoderLayer.residual_updates, fullgraph=True, options=options)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn,
                fused: bool = False, rope_table: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the last layer [n, hidden] for tokens `token_ids` [n] at `positions` [n].
        `fused`: run the compiled element-wise work of `compile_decode` (fixed-shape calls: decode steps), and
        the linear layers of at most `kernels.gemv.MAX_ROWS` tokens as `decode_linear` says (`linear`).
        `rope_table`: `rope.table(...)` covering `positions`, gathered rather than computed.
        Capturable in a CUDA graph when `attention` is."""
        x, o, m = self.residual_parts(token_ids, positions, attention, fused, rope_table)
        return x + o + m

    @torch.inference_mode()
    def decode_logits(self, token_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn,
                      fused: bool = False, rope_table: torch.Tensor | None = None) -> torch.Tensor:
        """`logits(forward(...))` of a decode step, its arguments as `forward`'s; with `fused` and
        `decode_linear` "gemv-fused" the last residual sum and the final norm are read into the lm_head."""
        parts = self.residual_parts(token_ids, positions, attention, fused, rope_table)
        return self.gathered(norm_linear(self.norm, self.lm_head, parts, self.decode_linear if fused else "torch")[1])

    def residual_parts(self, token_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn,
                       fused: bool, rope_table: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """`forward`'s residual stream as the three parts it sums: the last layer's input and its two updates."""
        cos, sin = self.rope(positions, self.embed_tokens.weight.dtype, rope_table)
        linears = self.decode_linear if fused else "torch"
        # gemv-fused leaves nothing for Inductor in a decode step's layer (the RoPE too, where the qkv kernel
        # takes it): those parts run uncompiled, which lets their kernels launch dependently
        uncompiled = linears == "gemv-fused" and token_ids.shape[0] <= MAX_ROWS
        rope_fused = rope_in_qkv(self.config, linears, token_ids.shape[0])
        residual_and_qkv = self.residual_and_qkv if fused and not rope_fused else DecoderLayer.residual_and_qkv
        residual_updates = self.residual_updates if fused and not uncompiled else DecoderLayer.residual_updates
        x = self.embed_tokens(token_ids)
        # Each layer hands the next what it adds, not the sum: compiled, a projection added to the residual
        # and returned becomes addmm, which copies the residual into its output first (two device copies a
        # layer); added inside the next graph, the sum fuses into its norm.
        o, m = torch.zeros_like(x), torch.zeros_like(x)  # two tensors, as every later layer gets: one graph
        for i, layer in enumerate(self.layers):
            x, q, k, v = residual_and_qkv(layer, x, o, m, cos, sin, linears)
            o, m = residual_updates(layer, x, attention(i, q, k, v), linears)
        return x, o, m

    def layer_forward(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      attention: AttentionFn) -> torch.Tensor:
        """The residual stream x [n, hidden] after layer `i` alone, at the positions of the RoPE tables
        cos/sin [n, head_dim] (eager): for work that runs every token through one layer before the next
        (layer-major prefill). `forward` is this over all layers."""
        layer = self.layers[i]
        q, k, v = DecoderLayer.attention_input(layer, x, cos, sin)
        return DecoderLayer.attention_output(layer, x, attention(i, q, k, v))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits [n, vocab] of residual-stream rows x [n, hidden] (all of them, on every GPU)."""
        return self.gathered(self.lm_head(self.norm(x)))

    def gathered(self, logits: torch.Tensor) -> torch.Tensor:
        """This GPU's lm_head columns -> float32 logits of the whole vocabulary."""
        if self.tp.sharded:
            logits = self.tp.gather_columns(logits)[:, : self.config.vocab_size]
        return logits.float()
