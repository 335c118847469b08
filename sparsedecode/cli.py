"""The command line: `sparsedecode generate | models | demo | eval | calibrate | bench`."""
from __future__ import annotations

import importlib
import sys

import click

#: subcommands that live beside their code, imported only when used (keeps `--help` fast)
LAZY_COMMANDS = {
    "eval": "sparsedecode.evals.cli:eval_command",
    "calibrate": "sparsedecode.roles.cli:calibrate_command",
    "bench": "sparsedecode.bench.cli:bench_group",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


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


@click.group(cls=LazyGroup)
@click.version_option(package_name="sparsedecode")
def main() -> None:
    """Fast long-context decoding that reads only the part of the KV cache that matters."""


@main.command()
@click.option("--model", "-m", default="smollm2-135m", show_default=True, help="Registry name, GGUF file or HF folder.")
@click.option("--method", default="dense", show_default=True, help="dense, lychee, tidal, quest, streaming, lfps, lychee+lfps")
@click.option("--option", "-o", "options", multiple=True, help="Method option key=value (e.g. budget=1024).")
@click.option("--prompt", "-p", help="Prompt text (default: read standard input).")
@click.option("--chat/--raw", default=True, show_default=True, help="Apply the model's chat template.")
@click.option("--max-new-tokens", "-n", default=256, show_default=True)
@click.option("--temperature", "-t", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", type=int)
@click.option("--device")
@click.option("--kv-offload", type=click.Choice(["cpu-index", "gpu-index"]), default=None,
              help="KV cache in host memory (methods lfps, lychee+lfps): the index scores on the CPU over host "
                   "keys, or on the GPU, where the keys then stay (only the values in host memory).")
@click.option("--offload-threads", type=click.IntRange(min=1), default=None,
              help="Threads of the CPU index (default: PyTorch's).")
def generate(model, method, options, prompt, chat, max_new_tokens, temperature, top_p, seed, device, kv_offload,
             offload_threads) -> None:
    """Generate a continuation, streamed to standard output."""
    from . import LLM
    from .offload import OffloadConfig

    text = prompt if prompt is not None else sys.stdin.read()
    if not text.strip():
        raise click.UsageError("empty prompt: pass --prompt or pipe text on standard input")
    if offload_threads is not None and kv_offload != "cpu-index":
        raise click.UsageError("--offload-threads sets the CPU index's threads: it needs --kv-offload cpu-index")
    offload = None if kv_offload is None else OffloadConfig(index=kv_offload.removesuffix("-index"),
                                                            cpu_threads=offload_threads)
    llm = LLM(model, method=method, device=device, kv_offload=offload, **parse_method_options(options))
    if chat:
        text = llm.apply_chat_template(text)
    for piece in llm.stream(text, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed):
        click.echo(piece, nl=False)
    click.echo()


@main.group()
def models() -> None:
    """The offline model registry."""


@models.command("list")
def models_list() -> None:
    """Models installable by name, and whether they are pulled."""
    from rich.console import Console
    from rich.table import Table

    from .models.registry import list_models, model_path

    table = Table("name", "architecture", "size", "context", "pulled")
    for spec in list_models():
        pulled = model_path(spec.name).is_file()
        table.add_row(spec.name, spec.architecture, f"{spec.size / 2**20:.0f} MiB", str(spec.default_context), "yes" if pulled else "no")
    Console().print(table)


@models.command("pull")
@click.argument("name")
def models_pull(name: str) -> None:
    """Download, reassemble and verify a registry model."""
    from .models.registry import UnknownModelError, pull_model

    try:
        click.echo(pull_model(name))
    except UnknownModelError as e:
        raise click.UsageError(str(e)) from e


@main.command()
@click.option("--model", "-m", default=None, help="Default: qwen2.5-coder-1.5b on GPU, qwen2.5-coder-0.5b on CPU.")
@click.option("--context", default=None, type=int, help="Haystack length in tokens (default: 32768 on GPU, 3072 on CPU).")
@click.option("--methods", default="dense,lychee,tidal,quest,lfps,lychee+lfps", show_default=True)
@click.option("--budget", default=None, type=int, help="Sparse budget in tokens (default: context / 8).")
@click.option("--device")
def demo(model, context, methods, budget, device) -> None:
    """Needle in a haystack of real essays, answered by each decode method."""
    from .demo import run_demo

    run_demo(model, context, [m for m in methods.split(",") if m], budget, device)
