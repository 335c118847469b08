"""`sparsedecode bench`: the kernel benchmark and the end-to-end decode benchmark."""
from __future__ import annotations

import re
from pathlib import Path

import click

DEFAULT_MODELS = "random:llama-3.1-8b,random:qwen3-8b,qwen2.5-coder-1.5b"
DEFAULT_METHODS = "dense,sdpa,lychee,tidal,quest,lfps,lychee+lfps"
HF_MODES = ("eager", "compiled")
_TOKENS = re.compile(r"(\d+)([km]?)", re.IGNORECASE)


def parse_tokens(text: str) -> int:
    """A token count: 4096, 4k (4096) or 1m (1048576)."""
    match = _TOKENS.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"bad token count {text!r}: use a positive count such as 4096, 4k or 1m")
    return int(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20}[match.group(2).lower()]


def _items(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _contexts(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        contexts = sorted({parse_tokens(t) for t in _items(value)})
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if not contexts:
        raise click.BadParameter("give at least one context")
    return contexts


def _context(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_tokens(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _batches(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    items = _items(value)
    if not items or not all(t.isdigit() and int(t) > 0 for t in items):
        raise click.BadParameter(f"{value!r}: give positive batch sizes separated by commas, such as 1,4,8")
    return sorted({int(t) for t in items})


def _methods(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    from ..methods import available  # noqa: F401  (registers the methods)
    from ..methods.base import METHODS
    from .e2e import SDPA

    known = sorted({*METHODS, SDPA})
    methods = list(dict.fromkeys(_items(value)))
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise click.BadParameter(f"unknown method(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return methods


def _models(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    from ..models.registry import MODELS
    from ..models.shapes import RANDOM_PREFIX, SHAPES

    models = list(dict.fromkeys(_items(value)))
    for m in models:
        if m.startswith(RANDOM_PREFIX):
            if m[len(RANDOM_PREFIX):] not in SHAPES:
                raise click.BadParameter(f"unknown random-weight shape {m!r}; known: "
                                         f"{', '.join(RANDOM_PREFIX + s for s in SHAPES)}")
        elif m not in MODELS and not Path(m).expanduser().exists():
            raise click.BadParameter(f"{m!r} is neither a random-weight shape, a registry model "
                                     f"({', '.join(MODELS)}) nor an existing path")
    if not models:
        raise click.BadParameter("give at least one model")
    return models


def _hf_modes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(_items(value)))
    if not modes or any(m not in HF_MODES for m in modes):
        raise click.BadParameter(f"{value!r}: give one or both of {', '.join(HF_MODES)}")
    return modes


@click.group("bench")
def bench_group() -> None:
    """Benchmarks on the GPU: the decode-attention kernel and the whole decode step."""


@bench_group.command("kernel")
@click.option("--contexts", default="32k,128k", show_default=True, callback=_contexts, help="Context lengths.")
@click.option("--batches", default="1,8", show_default=True, callback=_batches)
@click.option("--tune", is_flag=True, help="Instead of the table, search the kernels' launch settings (tiles, "
              "warps, pipelining, chunking) on fixed cases and print every setting tried.")
def kernel(contexts: list[int], batches: list[int], tune: bool) -> None:
    """One decode-attention layer (Llama-3.1-8B shapes): PyTorch SDPA against our dense and hybrid kernel."""
    from . import kernel_bench

    if tune:
        kernel_bench.tune()
    else:
        kernel_bench.run(tuple(contexts), tuple(batches))


@bench_group.command("e2e")
@click.option("--models", default=DEFAULT_MODELS, show_default=True, callback=_models,
              help="Comma-separated: random:<shape> (random weights), registry names, GGUF files or model folders.")
@click.option("--contexts", default="4k,32k,128k,256k", show_default=True, callback=_contexts,
              help="Context lengths (4096, 4k, 1m); configurations that do not fit in free GPU memory are skipped, "
                   "and real-weight models stop at their trained length.")
@click.option("--batches", default="1,4,8", show_default=True, callback=_batches)
@click.option("--methods", default=DEFAULT_METHODS, show_default=True, callback=_methods,
              help="Decode methods; dense (our kernel) is always measured; sdpa: dense attention through "
                   "PyTorch SDPA.")
@click.option("--budget", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Token budget of every method that takes one.")
@click.option("--roles", default="random:24", show_default=True,
              help="Head roles of lychee-type methods on random-weight shapes (random:24 plus layer 0 = 32 "
                   "retrieval units of Llama-3.1-8B's 256); real-weight models use their default roles.")
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=2),
              help="Timed decode steps per measurement (and N of the transformers baseline).")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=1),
              help="Untimed steps first; the first one captures the CUDA graph.")
@click.option("--hf-baseline/--no-hf-baseline", default=True, show_default=True,
              help="Also time transformers' generate (static cache, SDPA) on real-weight models, batch 1.")
@click.option("--hf-modes", default="eager,compiled", show_default=True, callback=_hf_modes,
              help="transformers baselines: eager, and/or compiled (its default on CUDA, torch.compile).")
@click.option("--hf-context", default="32k", show_default=True, callback=_context,
              help="Context of the transformers baseline (it prefills for real); must be one of --contexts.")
@click.option("--hf-random-shapes", is_flag=True,
              help="Run the transformers baseline on random-weight shapes too (a real prefill each).")
@click.option("--haystack", type=click.Path(exists=True, dir_okay=True),
              help="Prompt text of real-weight models: a text file or a folder of *.txt (default: the essays).")
@click.option("--compile/--no-compile", "compile_decode", default=True, show_default=True,
              help="Fuse the engine's element-wise decode work with torch.compile (--no-compile: measure it unfused).")
@click.option("--profile", is_flag=True, help="Also list the device time of each kernel in one step of each "
              "method (PyTorch profiler over CUDA-graph replays; CUDA only).")
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@click.option("--out", default="out/bench-e2e", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results.json, results.md and the PNG plots.")
def e2e(models: list[str], contexts: list[int], batches: list[int], methods: list[str], budget: int, roles: str,
        steps: int, warmup: int, hf_baseline: bool, hf_modes: tuple[str, ...], hf_context: int,
        hf_random_shapes: bool, haystack: str | None, compile_decode: bool, profile: bool, device: str | None,
        out: Path) -> None:
    """Whole decode steps per method: ms/step with spread, GB/s, the bytes floor, x dense, ceiling, x transformers."""
    from .e2e import E2EOptions, results_markdown, run_e2e

    if hf_baseline and hf_context not in contexts:
        raise click.BadParameter(f"{hf_context} is not one of the contexts {contexts}: add it to --contexts "
                                 "or pass --no-hf-baseline", param_hint="--hf-context")
    opts = E2EOptions(
        models=models, contexts=contexts, batches=batches, methods=methods, budget=budget, roles=roles,
        steps=steps, warmup=warmup, hf_modes=hf_modes if hf_baseline else (), hf_context=hf_context,
        hf_random_shapes=hf_random_shapes, haystack=haystack, device=device, compile_decode=compile_decode,
        profile=profile,
    )
    results = run_e2e(opts, out)
    click.echo(results_markdown(results))
    click.echo(f"written to {out}/")
