"""Learning LycheeDecode's head roles (`sparsedecode calibrate`): one stochastic gate per (layer, KV head)
outside layer 0, trained so that a student decoder in which every unit mixes its dense and its sparse
attention by its gate reproduces the dense teacher (`passes`), under a constraint on the expected number
of open gates. The model stays frozen; only the gates train. The loop follows the released LycheeDecode
training code (see shared/REFERENCE.md section 1).

One step: a passkey prompt (`passkey`) is prefilled into the shared cache, z is drawn once per unit, the
loss is the distillation loss plus the Lagrangian density term, and the gates take one AdamW step. A
checkpoint holds the gates, the optimiser, the constraint and both random states, so a resumed run
continues the same sequence of prompts and draws. The roles are read off the gate means (`readoff`).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..data.haystack import haystack_text
from ..core.selection import BlockSelector
from ..models.loader import LoadedModel, load_model
from ..utils.files import atomic_path
from .head_roles import HeadRoles
from .heuristics import ATTENTION_MASS, GATES, attention_mass_roles
from .passes import distillation_loss, new_cache, prefill_context
from .passkey import PasskeyPrompts
from .readoff import OPEN, check_target, roles_from_scores

LAMBDA_0, LAMBDA_RATE, LAMBDA_BOUNDS, MA_DECAY = 2.0, 0.001, (1e-12, 20.0), 0.9
WARMUP_FRACTION, DECAY_FRACTION, LR_FLOOR = 0.2, 0.2, 0.1


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
                with atomic_path(checkpoint) as tmp:
                    torch.save(
                        {
                            "settings": settings, "gates": gates.state_dict(), "optimizer": optimizer.state_dict(),
                            "constraint": constraint.state_dict(), "gate_rng": generator.get_state(),
                            "data_rng": prompts.rng.getstate(), "history": history,
                        },
                        tmp,
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
        "units_above_half": int((means > OPEN).sum()),
        "readoff": "top target_retrieval gate means" if count else f"gate mean > {OPEN}",
        "gate_mean": [[round(float(p), 4) for p in row] for row in means],
    }
    return roles_from_scores(means, config, count, source)
