"""`sparsedecode eval ruler|needle|reasoning`: the quality suites from the command line; `eval merge`: one
report from several results folders; `eval recall`: the attention-recall diagnostic of the decode methods."""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sparsedecode.cli import parse_method_options
from sparsedecode.engine import LLM, SamplingParams
from sparsedecode.models.loader import load_tokenizer

from .attention_recall import DEFAULT_TASK, RECALL_TASKS, recall_context, run_recall
from .needle import DEFAULT_DEPTHS
from .reasoning import generate_problems, write_problems
from .report import safe_name
from .ruler import RULER_TASKS
from .runner import context_needed, merge_results, run_eval, write_prompts

# Default samples per cell. RULER: 25 per task and length, so that a method's average (11 tasks x 4 lengths =
# 1,100 prompts) has a 95% interval of at most about +-2.5 points, and its paired difference to dense (where
# most prompts agree) a narrower one.
RULER_SAMPLES = 25
NEEDLE_SAMPLES = 5  # per depth and length: 220 prompts on the default 11 x 4 grid
REASONING_SAMPLES = 100  # one cell per budget: about +-10 points at 100 prompts
_LENGTH = re.compile(r"^(\d+(?:\.\d+)?)([kKmM]?)$")
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_length(text: str) -> int:
    """'4k' -> 4096, '32K' -> 32768, '32768' -> 32768, '1m' -> 1048576."""
    match = _LENGTH.match(text.strip())
    tokens = float(match[1]) * _UNITS[match[2].lower()] if match else 0
    if tokens < 1 or tokens != int(tokens):
        raise click.BadParameter(f"{text!r} is not a token count: use forms like 4096, 4k or 32K")
    return int(tokens)


def _comma_list(value: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise click.BadParameter("give at least one comma-separated value")
    return items


def _lengths(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    return sorted({parse_length(item) for item in _comma_list(value)})


def _budgets(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int]:
    return [] if value is None else sorted({parse_length(item) for item in _comma_list(value)})


def _tasks(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    tasks = _comma_list(value)
    unknown = [t for t in tasks if t not in RULER_TASKS]
    if unknown:
        raise click.BadParameter(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(RULER_TASKS)}")
    return list(dict.fromkeys(tasks))


def _depths(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    try:
        depths = sorted({float(item) for item in _comma_list(value)})
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if depths[0] < 0 or depths[-1] > 1:
        raise click.BadParameter("depths are fractions of the haystack, from 0 (start) to 1 (end)")
    return depths


def method_runs(methods: list[str], budgets: list[int], method_options: tuple[str, ...],
                variants: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """The (method, options) pairs to run: every method that takes a budget once per budget; `key=value`
    goes to every method that accepts `key`, `method:key=value` to that method only. A variant
    `method:key=value[,key=value]` adds one more run of `method` with these options on top of its own
    (e.g. roles files side by side), also once per budget."""
    from sparsedecode.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise click.BadParameter(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(METHODS))}",
                                 param_hint="--methods")
    options: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in method_options:
        target = item.partition("=")[0].rpartition(":")[0]  # "" when the option is for every method
        if "=" not in item or (target and target not in methods):
            raise click.BadParameter(f"{item!r}: use KEY=VALUE or METHOD:KEY=VALUE with METHOD one of "
                                     f"{', '.join(methods)}", param_hint="--method-option")
        (key, value), = parse_method_options((item[len(target) + 1 if target else 0:],)).items()
        targets = [target] if target else [m for m in methods if key in METHODS[m].defaults]
        if not targets or any(key not in METHODS[m].defaults for m in targets):
            raise click.BadParameter(f"{item!r}: no selected method takes option {key!r}",
                                     param_hint="--method-option")
        for m in targets:
            options[m][key] = value
    runs = []
    for m, run_options in [(m, options[m]) for m in methods] + [_variant(v, options) for v in variants]:
        if budgets and "budget" in METHODS[m].defaults and "budget" not in run_options:
            runs.extend((m, {**run_options, "budget": b}) for b in budgets)
        else:
            runs.append((m, run_options))
    return runs


def _variant(text: str, options: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    from sparsedecode.methods import METHODS

    method, _, pairs = text.partition(":")
    items = tuple(item.strip() for item in pairs.split(",") if item.strip())
    if method not in METHODS or not items:
        raise click.BadParameter(f"{text!r}: use METHOD:KEY=VALUE[,KEY=VALUE] with METHOD one of "
                                 f"{', '.join(sorted(METHODS))}", param_hint="--variant")
    own = parse_method_options(items)
    unknown = sorted(set(own) - set(METHODS[method].defaults))
    if unknown:
        raise click.BadParameter(f"{text!r}: method {method!r} takes no option {', '.join(unknown)}",
                                 param_hint="--variant")
    return method, {**options.get(method, {}), **own}


PROMPTS_ONLY = click.option(
    "--prompts-only", is_flag=True,
    help="Only write OUT/samples.json, the prompts this command decodes, and decode nothing (the tokenizer is "
         "loaded, not the model): restores a results folder kept without its samples.json, so that it can be "
         "resumed or merged again.")


def _common_options(default_lengths: str, lengths_help: str, default_samples: int,
                    suite_options: tuple[Callable, ...] = ()) -> Callable:
    options = [
        click.option("--model", "-m", required=True, help="Registry name (e.g. smollm2-135m), GGUF file or "
                                                          "Hugging Face model folder."),
        click.option("--methods", default="dense", show_default=True, callback=lambda c, p, v: _comma_list(v),
                     help="Comma-separated decode methods: dense, lychee, tidal, quest, streaming, lfps, "
                          "lychee+lfps."),
        click.option("--lengths", default=default_lengths, show_default=True, callback=_lengths,
                     help=lengths_help),
        click.option("--samples", type=click.IntRange(min=1), default=default_samples, show_default=True,
                     help="Samples per task and length (per depth and length for the needle grid)."),
        click.option("--budget", default=None, callback=_budgets,
                     help="Token budget of every sparse method, e.g. 1024 or 1k; a comma list runs each budget."),
        click.option("--method-option", "method_options", multiple=True, metavar="[METHOD:]KEY=VALUE",
                     help="A decode-method option; repeat for more."),
        click.option("--variant", "variants", multiple=True, metavar="METHOD:KEY=VALUE[,KEY=VALUE]",
                     help="One more run of METHOD with these options (e.g. lychee:roles=all); repeat for more."),
        click.option("--seed", type=int, default=42, show_default=True,
                     help="Seed of the prompts; the same seed and tokenizer give the same prompts."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Output folder [default: out/eval/<suite>-<model>]. A folder with results of the same "
                          "suite, model and seed is resumed: the records it has are kept and only the missing "
                          "ones generated; other settings are refused."),
        click.option("--device", default=None, help="torch device, e.g. cuda or cpu [default: the best one]."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="Compute dtype [default: the model loader's choice]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Prompts generated together."),
        click.option("--gpu-memory-utilization", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.9,
                     show_default=True, help="This run's share of the GPU's memory for the weights and the KV pool "
                     "(two runs at 0.45 share one GPU)."),
        click.option("--haystack", type=click.Path(exists=True, path_type=Path), default=None,
                     help="Text file or folder of *.txt to use instead of the Paul Graham essays."),
    ]

    def decorate(command: Callable) -> Callable:
        for option in reversed([*options, *suite_options]):
            command = option(command)
        return command

    return decorate


def _run(suite: str, model: str, methods: list[str], lengths: list[int], samples: int, budget: list[int],
         method_options: tuple[str, ...], variants: tuple[str, ...], seed: int, out: Path | None,
         device: str | None, dtype: str | None, batch_size: int, haystack: Path | None, gpu_memory_utilization: float,
         **suite_options: Any) -> None:
    runs = method_runs(methods, budget, method_options, variants)
    out = out or Path("out") / "eval" / f"{suite}-{safe_name(Path(model).stem)}"
    if suite_options.pop("prompts_only", False):
        try:
            path, count = write_prompts(load_tokenizer(model), suite, lengths, samples, seed, out, model_name=model,
                                        haystack=haystack, **suite_options)
        except (ValueError, ImportError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"wrote {path}: {count} prompts")
        return
    first_method, first_options = runs[0]
    recall = suite == "recall"  # the diagnostic observes every attention call, so it decodes eagerly
    max_context = (recall_context(lengths, suite_options["steps"]) if recall
                   else context_needed(suite, lengths, suite_options.get("problems_per_prompt", 1)))
    try:
        SamplingParams(seed=seed)  # what the engine refuses fails here, before the model loads
        llm = LLM(model, method=first_method, device=device, dtype=dtype, max_context=max_context,
                  gpu_memory_utilization=gpu_memory_utilization, **({"cuda_graphs": False} if recall else {}),
                  **first_options)
        llm.engine.check_fits(max_context, 0)  # the longest prompt and its answer, before any file is written
        common = dict(haystack=haystack, model_name=model, **suite_options)
        if recall:
            report = run_recall(llm, runs, lengths, samples, seed, batch_size, out, **common)
        else:
            report = run_eval(llm, suite, runs, lengths, samples, seed, batch_size, out, **common)
    except (ValueError, ImportError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    _show(report.markdown, report.files, [] if recall else report.notes)


def _show(markdown: str, files: list[Path], notes: list[str]) -> None:
    click.echo(markdown)
    for note in notes:
        click.echo(note)
    click.echo("wrote " + ", ".join(str(p) for p in files))


@click.group("eval")
def eval_command() -> None:
    """Long-context quality suites: RULER, the needle grid and long reasoning, one column per method;
    and the attention-recall diagnostic."""


@eval_command.command("ruler")
@_common_options("4k,8k,16k,32k", "Comma-separated prompt lengths in tokens (4k, 32K, 32768).", RULER_SAMPLES,
                 (PROMPTS_ONLY,))
@click.option("--tasks", default=None, callback=_tasks,
              help=f"Comma-separated RULER tasks [default: all: {', '.join(RULER_TASKS)}].")
@click.option("--squad", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="SQuAD v2 dev JSON (dev-v2.0.json); without it qa_1 is skipped.")
@click.option("--hotpotqa", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="HotpotQA dev JSON (hotpot_dev_distractor_v1.json); without it qa_2 is skipped.")
def ruler_command(**options: Any) -> None:
    """RULER's synthetic tasks (NIAH variants, variable tracking, common/frequent words, QA).

    \b
    A standard run (25 samples per task and length) is long on one GPU (docs/evals.md gives its measured
    duration). Split a long run by --lengths / --budget over calls into the same --out (or merge folders
    with `eval merge`).
    """
    _run("ruler", **options)


@eval_command.command("needle")
@_common_options("4k,8k,16k,32k", "Comma-separated prompt lengths in tokens (4k, 32K, 32768).", NEEDLE_SAMPLES,
                 (PROMPTS_ONLY,))
@click.option("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS), show_default=True,
              callback=_depths, help="Comma-separated needle depths, 0 (start) to 1 (end).")
def needle_command(**options: Any) -> None:
    """A magic number at each depth x length of a grid: a heatmap per method."""
    _run("needle", **options)


@eval_command.command("reasoning")
@_common_options("2k", "Comma-separated generation budgets (max new tokens) of the chain of thought.",
                 REASONING_SAMPLES, (PROMPTS_ONLY,))
@click.option("--problems", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON Lines of problems from `eval export-problems` (no reasoning-gym needed) "
                   "[default: generate them with reasoning-gym from the seed].")
@click.option("--problems-per-prompt", type=click.IntRange(min=1), default=1, show_default=True,
              help="Problems chained in one prompt and solved in one answer (\"Answer k: <number>\" each), "
                   "for generations as long as the chain; needs --samples times this many problems.")
def reasoning_command(**options: Any) -> None:
    """GSM-style problems from reasoning-gym solved with a long chain of thought."""
    _run("reasoning", **options)


@eval_command.command("export-problems")
@click.option("--samples", type=click.IntRange(min=1), default=REASONING_SAMPLES, show_default=True,
              help="Problems to write.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the problems (as in `eval reasoning`).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="JSON Lines file.")
def export_problems_command(samples: int, seed: int, out: Path) -> None:
    """Write the reasoning problems to a file, for `eval reasoning --problems` on a machine without
    reasoning-gym."""
    try:
        write_problems(out, generate_problems(samples, seed))
    except ImportError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {samples} problems to {out}")


@eval_command.command("merge")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tasks", default=None, help="Comma-separated tasks to keep (e.g. the ones a variant ran on, "
              "so that every method is compared on the same prompts) [default: all].")
def merge_command(out_dir: Path, sources: tuple[Path, ...], tasks: str | None) -> None:
    """Merge the results folders SOURCES into OUT_DIR (with the results OUT_DIR holds already) and write one
    report with the intervals. The folders must be of the same suite, model and seed and agree on the prompts
    they share; a (method run, prompt) record in several of them is taken from the first."""
    try:
        report = merge_results(out_dir, list(sources), set(tasks.split(",")) if tasks else None)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    _show(report.markdown, report.files, report.notes)


@eval_command.command("recall")
@_common_options("8k", "Comma-separated prompt lengths in tokens (4k, 32K, 32768).", 2)
@click.option("--steps", type=click.IntRange(min=1), default=16, show_default=True,
              help="Decode steps scored per prompt.")
@click.option("--task", type=click.Choice(RECALL_TASKS), default=DEFAULT_TASK, show_default=True,
              help="RULER task whose prompts are decoded.")
def recall_command(**options: Any) -> None:
    """Attention recall per layer and KV head: the share of the dense attention mass held by the tokens
    each method reads (JSON, markdown and a heatmap per method)."""
    _run("recall", **options)
