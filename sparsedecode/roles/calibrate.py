"""Learning LycheeDecode's head roles (`sparsedecode calibrate`): one stochastic gate per (layer, KV head)
outside layer 0, trained so that a student decoder in which every unit mixes its dense and its sparse
attention by its gate reproduces the dense teacher, under a constraint on the expected number of open
gates. The model stays frozen; only the gates train.

One step (the released LycheeDecode training code, see shared/REFERENCE.md section 1):
- a multi-passkey prompt (10 keys hidden in real text) is prefilled densely in chunks of 1000 tokens,
  without gradients, into a KV cache that teacher and student then share;
- the answer tokens (the keys) run after it as one short causal sequence, once densely (teacher) and
  once with attention `z * dense + (1 - z) * sparse` per unit (student), z drawn once per unit;
- loss = squared difference of the final hidden states, mean over the hidden size, summed over the
  answer tokens, divided by their number; plus the Lagrangian density term.

Sparse attention of the student is the lychee decode attention in ratio mode (30% of the blocks, sink
and newest block always kept), per answer token as if it were a decode step. Which blocks a sparse
unit reads flows down the layers as at inference: a unit whose sampled z exceeds 0.5 counts as a
retrieval head in this step and hands the top blocks of its own dense attention to the same KV-head
index of the following layers; a sparse unit reads what the nearest earlier such unit handed on (layer
0 always hands on). So a sparse unit's error, and with it the push to open its gate, grows with the
staleness of the blocks it inherits, as at inference. Block choice and hand-on follow the sampled z
without gradient (a hard top-k); gradients reach z through the mixing.

Read-off: p = E[z] per unit (quadrature, `StretchedGate.mean`); layer 0 is retrieval; with a target
count N the N units of largest p are retrieval (how many had p > 0.5 is kept as `units_above_half`),
with a target density those with p > 0.5.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..data.haystack import haystack_text
from ..kernels.reference import visible_tokens
from ..methods.selection import BlockSelector, block_scores
from ..models.config import ModelConfig
from ..models.loader import LoadedModel, load_model
from ..models.transformer import Transformer, prefill_attention
from .head_roles import HeadRoles

NUM_PASSKEYS = 10
DEPTH_RANGE = (0.05, 0.95)
MIN_FILLER = 64  # tokens of haystack a prompt needs at least, so the keys sit in text and not side by side
PREFILL_CHUNK = 1000
LAMBDA_0, LAMBDA_RATE, LAMBDA_BOUNDS, MA_DECAY = 2.0, 0.001, (1e-12, 20.0), 0.9
WARMUP_FRACTION, DECAY_FRACTION, LR_FLOOR = 0.2, 0.2, 0.1
HANDS_ON = 0.5  # a sampled z above this makes the unit a retrieval head for the step's block hand-on
ATTENTION_MASS = "attention-mass"  # the training-free baseline, chosen like a gate family
QUESTION = (
    f"\n\nWhat are the {NUM_PASSKEYS} passkeys hidden in the text above? "
    "List them in the order they appear, separated by commas."
)


# ---------------------------------------------------------------- data


@dataclass
class PasskeySample:
    prompt: torch.Tensor  # [P] token ids, the context
    answer: torch.Tensor  # [m] token ids: the keys, in order, separated by ", "
    needle_spans: list[tuple[int, int]]  # prompt positions of needle j
    key_spans: list[tuple[int, int]]  # answer positions of key j


class PasskeyPrompts:
    """Multi-passkey prompts: 10 random 5-digit keys hidden at random depths in 0.05-0.95 of a window of
    `text` (at sentence ends), total lengths uniform in [min_length, max_length] tokens, in the model's
    chat template. A text shorter than max_length tokens is repeated. Reproducible from `seed`."""

    def __init__(self, tokenizer: Any, text: str, min_length: int, max_length: int, seed: int) -> None:
        if tokenizer is None:
            raise ValueError("calibration needs the model's tokenizer (random-weight shapes have none)")
        if not 0 < min_length <= max_length:
            raise ValueError(f"need 0 < min length <= max length, got {min_length} and {max_length}")
        self.tokenizer = tokenizer
        self.min_length, self.max_length = min_length, max_length
        self.prefix, self.suffix = (self._encode(part) for part in self._template())
        self.question = self._encode(QUESTION)
        overhead = len(self.prefix) + len(self.question) + len(self.suffix)
        overhead += NUM_PASSKEYS * len(self._needle(NUM_PASSKEYS, 99999))
        if min_length < overhead + MIN_FILLER:
            raise ValueError(
                f"min length {min_length} is too short: {NUM_PASSKEYS} passkeys and the question take "
                f"{overhead} tokens; use at least {overhead + MIN_FILLER}"
            )
        filler = self._encode(text)
        if not filler:
            raise ValueError("the haystack text is empty")
        self.filler = filler * math.ceil(max_length / len(filler))
        ends = {t for t in set(filler) if tokenizer.decode([t]).rstrip().endswith((".", "!", "?"))}
        self.breaks = [i + 1 for i, t in enumerate(self.filler) if t in ends]
        self.rng = random.Random(seed)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _template(self) -> tuple[str, str]:
        """The prompt text before and after the user's message."""
        if not getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.bos_token or "", "\nAnswer: "
        marker = "\x00MESSAGE\x00"
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        before, after = rendered.split(marker)
        return before, after

    def _needle(self, number: int, key: int) -> list[int]:
        return self._encode(f" The passkey number {number} is {key}.")

    def _snap(self, position: int, limit: int) -> int:
        """The first sentence end at or after `position`, not beyond `limit`."""
        i = bisect.bisect_left(self.breaks, position)
        return min(self.breaks[i], limit) if i < len(self.breaks) else limit

    def sample(self) -> PasskeySample:
        rng = self.rng
        length = rng.randint(self.min_length, self.max_length)
        keys = [rng.randint(10000, 99999) for _ in range(NUM_PASSKEYS)]
        needles = [self._needle(j + 1, key) for j, key in enumerate(keys)]
        fixed = len(self.prefix) + len(self.question) + len(self.suffix) + sum(map(len, needles))
        n = length - fixed
        start = rng.randrange(len(self.filler) - n + 1)
        cuts = sorted(self._snap(start + round(rng.uniform(*DEPTH_RANGE) * n), start + n) for _ in keys)
        prompt, needle_spans, previous = list(self.prefix), [], start
        for cut, needle in zip(cuts, needles):
            prompt += self.filler[previous:cut]
            needle_spans.append((len(prompt), len(prompt) + len(needle)))
            prompt += needle
            previous = cut
        prompt += self.filler[previous : start + n] + self.question + self.suffix
        answer, key_spans = [], []
        for j, key in enumerate(keys):
            piece = self._encode(f", {key}" if j else str(key))
            key_spans.append((len(answer), len(answer) + len(piece)))
            answer += piece
        return PasskeySample(torch.tensor(prompt), torch.tensor(answer), needle_spans, key_spans)


# ---------------------------------------------------------------- the passes


@dataclass
class ContextKV:
    """The K/V of one prompt, [layers, kv_heads, capacity, head_dim] each, shared by teacher and student."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.k.device


def new_cache(loaded: LoadedModel, max_length: int) -> ContextKV:
    """A one-sequence cache for prompts of up to `max_length` tokens, reused by every step."""
    c = loaded.config
    weight = next(loaded.model.parameters())
    shape = (c.num_layers, c.num_kv_heads, -(-max_length // PREFILL_CHUNK) * PREFILL_CHUNK, c.head_dim)
    return ContextKV(torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                     torch.zeros(shape, dtype=weight.dtype, device=weight.device))


def prefill_context(model: Transformer, cache: ContextKV, prompt: torch.Tensor) -> torch.Tensor:
    """Dense chunked prefill of the prompt into `cache` (no gradients); returns the last token's final
    normalised hidden state [hidden]."""
    prompt = prompt.to(cache.device)
    for start in range(0, prompt.shape[0], PREFILL_CHUNK):
        chunk = prompt[start : start + PREFILL_CHUNK]
        end = start + chunk.shape[0]

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[layer, :, start:end], cache.v[layer, :, start:end] = k.transpose(0, 1), v.transpose(0, 1)
            keys, values = cache.k[layer, :, :end], cache.v[layer, :, :end]
            return prefill_attention(q.transpose(0, 1), keys, values).transpose(0, 1)

        x = model.forward(chunk, torch.arange(start, end, device=cache.device), attention)
    return model.norm(x[-1])


def _handed_blocks(
    logits: torch.Tensor, seq_lens: torch.Tensor, selector: BlockSelector, aggregate: str
) -> torch.Tensor:
    """The tokens each answer token's KV heads hand on: the selector's top blocks of the dense attention.
    logits: [Hkv, G, m, T] scores with the causal mask applied -> visible tokens [m, Hkv, T]."""
    heads, group, m, capacity = logits.shape
    unit_lse = logits.view(heads, group, m, -1, selector.block_size).logsumexp(-1)
    scores = block_scores(
        unit_lse.permute(2, 0, 1, 3).reshape(m, heads * group, -1),
        logits.logsumexp(-1).permute(2, 0, 1).reshape(m, heads * group),
        heads,
        aggregate,
    )
    blocks, counts = selector.select(scores, seq_lens, selector.list_length(capacity))
    return visible_tokens(seq_lens, capacity, selector.block_size, blocks, counts, None, heads)


def answer_hidden_states(
    model: Transformer,
    cache: ContextKV,
    context_len: int,
    answer: torch.Tensor,
    gates: torch.Tensor | None = None,
    selector: BlockSelector | None = None,
    aggregate: str = "max",
    on_attention: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Final normalised hidden states [m, hidden] of the answer tokens at positions context_len ..
    context_len + m, causal among themselves, over the `context_len` tokens cached in sequence 0.
    gates None: the dense teacher. gates [layers, Hkv]: the student, unit attention
    `z * dense + (1 - z) * sparse` with blocks from `selector` (see the module doc).
    on_attention(layer, probs [Hkv, G, m, T]) sees each layer's dense attention."""
    c = model.config
    m, heads = answer.shape[0], c.num_kv_heads
    device = cache.device
    end = context_len + m
    capacity = -(-end // selector.block_size) * selector.block_size if gates is not None else end
    positions = torch.arange(context_len, end, device=device)
    seq_lens = positions + 1
    causal = torch.arange(capacity, device=device) < seq_lens[:, None]
    cos, sin = model.rope(positions, cache.k.dtype)
    hands_on = (gates > HANDS_ON).cpu() if gates is not None else None  # one host sync per pass
    handed = None  # [m, Hkv, T]: tokens the sparse units of each KV-head index read
    x = model.embed_tokens(answer.to(device))
    for i, layer in enumerate(model.layers):
        q, k, v = layer.attention_input(x, cos, sin)
        cached_k, cached_v = cache.k[i, :, :context_len], cache.v[i, :, :context_len]
        keys = F.pad(torch.cat([cached_k, k.transpose(0, 1)], dim=1).float(), (0, 0, 0, capacity - end))
        values = F.pad(torch.cat([cached_v, v.transpose(0, 1)], dim=1).float(), (0, 0, 0, capacity - end))
        queries = q.float().view(m, heads, c.group_size, c.head_dim) * c.head_dim**-0.5
        logits = torch.einsum("mhgd,htd->hgmt", queries, keys)
        causal_logits = logits.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(causal_logits, dim=-1)
        out = torch.einsum("hgmt,htd->mhgd", probs, values)
        if on_attention is not None:
            on_attention(i, probs)
        if gates is not None:
            if handed is not None:
                sparse = torch.softmax(logits.masked_fill(~handed.transpose(0, 1)[:, None], float("-inf")), dim=-1)
                z = gates[i].view(1, heads, 1, 1)
                out = z * out + (1 - z) * torch.einsum("hgmt,htd->mhgd", sparse, values)
            if hands_on[i].any() and i + 1 < c.num_layers:
                with torch.no_grad():
                    chosen = _handed_blocks(causal_logits, seq_lens, selector, aggregate)
                keep = hands_on[i].to(device)[None, :, None]
                handed = chosen if handed is None else torch.where(keep, chosen, handed)
        x = layer.attention_output(x, out.to(x.dtype))
    return model.norm(x)


def distillation_loss(
    model: Transformer, cache: ContextKV, sample: PasskeySample, gates: torch.Tensor, selector: BlockSelector,
    aggregate: str = "max",
) -> torch.Tensor:
    """Squared difference of the student's and the dense teacher's final hidden states over the answer:
    mean over the hidden size, summed over the answer tokens, divided by their number. The prompt must
    be in `cache` already."""
    context_len = sample.prompt.shape[0]
    with torch.no_grad():
        teacher = answer_hidden_states(model, cache, context_len, sample.answer)
    student = answer_hidden_states(model, cache, context_len, sample.answer, gates, selector, aggregate)
    return (student.float() - teacher.float()).pow(2).mean(-1).sum() / sample.answer.shape[0]


# ---------------------------------------------------------------- training pieces


class DensityConstraint:
    """The reference's Lagrangian on the expected density: c = relu(density - target), reported through
    a moving average (c_ma = 0.9 c_ma + 0.1 c; c = c + (c_ma - c).detach(): the value of c_ma, the
    gradient of c), lambda <- clamp(lambda * exp(0.001 c), 1e-12, 20) from 2; the term is lambda * c."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.lam = LAMBDA_0
        self.c_ma = 0.0

    def __call__(self, density: torch.Tensor) -> torch.Tensor:
        c = torch.relu(density - self.target)
        self.c_ma = MA_DECAY * self.c_ma + (1 - MA_DECAY) * float(c.detach())
        c = c + (self.c_ma - c).detach()
        self.lam = min(max(self.lam * math.exp(LAMBDA_RATE * self.c_ma), LAMBDA_BOUNDS[0]), LAMBDA_BOUNDS[1])
        return self.lam * c

    def state_dict(self) -> dict[str, float]:
        return {"lam": self.lam, "c_ma": self.c_ma}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.lam, self.c_ma = state["lam"], state["c_ma"]


def lr_factor(step: int, steps: int) -> float:
    """Of the base lr at 0-based `step`: linear warm-up over the first 20% of the steps, flat, then
    linear decay over the last 20% down to 0.1 at the last step."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    decay = max(1, round(DECAY_FRACTION * steps))
    left = steps - 1 - step  # steps after this one
    if step < warmup:
        return (step + 1) / warmup
    if left < decay:
        return LR_FLOOR + (1 - LR_FLOOR) * left / decay
    return 1.0


def check_target(config: ModelConfig, target_retrieval: int | None, density: float | None) -> tuple[float, int | None]:
    """(target density, target count or None) from exactly one of them. The density counts learned
    retrieval units over all units (the reference's 24 of 256 for Llama-3-8B); layer 0 comes on top."""
    units = config.num_layers * config.num_kv_heads
    learnable = units - config.num_kv_heads
    if (target_retrieval is None) == (density is None):
        raise ValueError("give exactly one of the target number of retrieval units or the target density")
    if target_retrieval is not None:
        if not 1 <= target_retrieval <= learnable:
            raise ValueError(
                f"target of {target_retrieval} retrieval units is out of range: this model has {learnable} "
                f"units outside layer 0 ({config.num_layers} layers x {config.num_kv_heads} KV heads, layer 0 "
                "always retrieval)"
            )
        return target_retrieval / units, target_retrieval
    if not 0 < density <= learnable / units:
        raise ValueError(f"target density {density} is out of range: it must lie in (0, {learnable / units:.4f}]")
    return density, None


def roles_from_scores(
    scores: torch.Tensor, config: ModelConfig, count: int | None, source: dict[str, Any]
) -> HeadRoles:
    """Roles from per-unit scores of layers 1.. [layers - 1, Hkv]: the `count` best units, or (count None)
    the units whose score (a gate's mean) exceeds 0.5. Layer 0 is always retrieval."""
    mask = torch.zeros(config.num_layers, config.num_kv_heads, dtype=torch.bool)
    if count is None:
        mask[1:] = scores > 0.5
    else:
        mask[1:].view(-1)[scores.flatten().topk(count).indices] = True
    return HeadRoles(mask, config.identity(), source)


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("calibrating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not enabled,
    )


# ---------------------------------------------------------------- the entry point


def calibrate(
    model: LoadedModel | str | Path,
    *,
    target_retrieval: int | None = None,
    density: float | None = None,
    steps: int = 3000,
    data: str = "passkey",
    min_length: int = 1000,
    max_length: int = 10000,
    lr: float = 0.01,
    seed: int = 0,
    gate: str = "hardkuma",
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 200,
    resume: bool = False,
    log: str | Path | None = None,
    device: str | torch.device | None = None,
    haystack: str | Path | None = None,
    keep_ratio: float = 0.3,
    block_size: int = 64,
    aggregate: str = "max",
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> HeadRoles:
    """Learn head roles for `model` (a LoadedModel, or anything `load_model` takes, loaded on `device`).

    Give `target_retrieval` N (exactly N retrieval units outside layer 0: the N units with the largest
    gate mean, density target N / all units) or `density` D (retrieval where the gate mean > 0.5).
    `gate`: "hardkuma" (the method), "hardconcrete" or "continuous" (ablations trained by the same loop),
    or "attention-mass" (training-free; `steps` prompts are scored). `checkpoint` is written atomically
    every `checkpoint_every` steps and at the end; `resume` continues from it. `log` gets one JSON line
    per step. `on_step(record)` is called after each step. Returns the roles; the learned gate means,
    settings and summary are in `roles.source`.
    """
    from .heuristics import GATES, attention_mass_roles  # heuristics builds on this module

    if gate not in GATES and gate != ATTENTION_MASS:
        raise ValueError(f"unknown gate {gate!r}; choose one of {', '.join([*GATES, ATTENTION_MASS])}")
    if data != "passkey":
        raise ValueError(f"unknown calibration data {data!r}; available: passkey")
    if steps < 1 or checkpoint_every < 1:
        raise ValueError("steps and checkpoint_every must be positive")
    if resume and (checkpoint is None or not Path(checkpoint).is_file()):
        raise FileNotFoundError(f"nothing to resume: no checkpoint at {checkpoint}")
    selector = BlockSelector("ratio", keep_ratio, block_size)
    text = haystack_text(haystack)  # before the model: a wrong path fails at once
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    config = loaded.config
    target, count = check_target(config, target_retrieval, density)
    if max_length > config.max_position_embeddings:
        raise ValueError(f"max length {max_length} exceeds the model's context of {config.max_position_embeddings}")
    units = config.num_layers * config.num_kv_heads
    prompts = PasskeyPrompts(loaded.tokenizer, text, min_length, max_length, seed)
    settings = {
        "model": loaded.source, "config_hash": config.identity()["config_hash"], "gate": gate, "data": data,
        "steps": steps, "lr": lr, "seed": seed, "min_length": min_length, "max_length": max_length,
        "target_density": target, "target_retrieval": count, "keep_ratio": keep_ratio,
        "block_size": block_size, "aggregate": aggregate,
        "haystack": str(haystack) if haystack else "paul-graham-essays",
    }
    if gate == ATTENTION_MASS:
        roles = attention_mass_roles(loaded, prompts, count or round(target * units), steps, progress)
        roles.source = {**settings, **roles.source}
        return roles

    transformer = loaded.model.requires_grad_(False)
    gates = GATES[gate]((config.num_layers - 1, config.num_kv_heads)).to(next(transformer.parameters()).device)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=lr, weight_decay=0.0)
    constraint = DensityConstraint(target)
    generator = torch.Generator().manual_seed(seed)
    cache = new_cache(loaded, max_length)
    history: list[dict[str, Any]] = []
    if resume:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # a GPU run may resume anywhere
        changed = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
        if changed:
            raise ValueError(f"cannot resume {checkpoint}: settings differ (checkpoint, now): {changed}")
        gates.load_state_dict(state["gates"])
        optimizer.load_state_dict(state["optimizer"])
        constraint.load_state_dict(state["constraint"])
        generator.set_state(state["gate_rng"])
        prompts.rng.setstate(state["data_rng"])
        history = state["history"]
    ones = torch.ones(1, config.num_kv_heads, device=cache.device)  # layer 0: always retrieval

    with _progress(progress) as bar, (open(log, "w") if log else contextlib.nullcontext()) as log_file:
        task = bar.add_task("calibrating", total=steps, completed=len(history), status="")
        if log_file:  # a resumed run rewrites the log up to its checkpoint: later lines never happened
            log_file.writelines(json.dumps(record) + "\n" for record in history)
        for step in range(len(history), steps):
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step, steps)
            sample = prompts.sample()
            prefill_context(transformer, cache, sample.prompt)
            z = torch.cat([ones, gates.sample(generator)])
            distill = distillation_loss(transformer, cache, sample, z, selector, aggregate)
            expected_density = gates.cost().sum() / units
            loss = distill + constraint(expected_density)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            gates.clamp_()
            record = {
                "step": step + 1, "loss": loss.item(), "distill": distill.item(),
                "density": expected_density.item(), "lambda": constraint.lam,
                "lr": optimizer.param_groups[0]["lr"], "tokens": len(sample.prompt) + len(sample.answer),
                "seconds": time.perf_counter() - started,
            }
            history.append(record)
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                _save_atomically(
                    {
                        "settings": settings, "gates": gates.state_dict(), "optimizer": optimizer.state_dict(),
                        "constraint": constraint.state_dict(), "gate_rng": generator.get_state(),
                        "data_rng": prompts.rng.getstate(), "history": history,
                    },
                    Path(checkpoint),
                )
            bar.update(
                task, advance=1,
                status=f"loss {record['distill']:.4f}  λ {record['lambda']:.4f}  density {record['density']:.3f}",
            )
            if on_step is not None:
                on_step(record)

    with torch.no_grad():
        means = gates.mean().cpu()
        final_density = float(gates.cost().sum() / units)
    tail = max(1, steps // 10)
    source = {
        "method": "calibrate",
        **settings,
        "final_density": round(final_density, 5),
        "first_distill": sum(r["distill"] for r in history[:tail]) / tail,
        "final_distill": sum(r["distill"] for r in history[-tail:]) / tail,
        "summary_window": tail,
        "seconds": round(sum(r["seconds"] for r in history), 1),
        "device": str(cache.device),
        "units_above_half": int((means > 0.5).sum()),
        "readoff": "top target_retrieval gate means" if count else "gate mean > 0.5",
        "gate_mean": [[round(float(p), 4) for p in row] for row in means],
    }
    return roles_from_scores(means, config, count, source)
