"""`sparsedecode calibrate`: learn a model's head roles and write them as a roles file."""
from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from .calibrate import calibrate
from .heuristics import ATTENTION_MASS, GATES


@click.command("calibrate")
@click.option("--model", required=True, help="Registry name, .gguf file or Hugging Face model folder.")
@click.option("--target-retrieval", type=int, help="Exactly this many retrieval units outside layer 0.")
@click.option("--density", type=float, help="Target density (learned retrieval units / all units); read-off p > 0.5.")
@click.option("--steps", type=int, default=3000, show_default=True, help="Training steps (prompts for attention-mass).")
@click.option("--data", type=click.Choice(["passkey"]), default="passkey", show_default=True)
@click.option("--min-length", type=int, default=1000, show_default=True, help="Shortest prompt, tokens.")
@click.option("--max-length", type=int, default=10000, show_default=True, help="Longest prompt, tokens.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True)
@click.option("--seed", type=click.IntRange(-2**63, 2**64 - 1), default=0, show_default=True,
              help="Seed of the prompts and the gates' noise (torch's range: -2**63 to 2**64 - 1).")
@click.option("--gate", type=click.Choice([*GATES, ATTENTION_MASS]), default="hardkuma", show_default=True,
              help="HardKuma (the method) or an ablation baseline.")
@click.option("--keep-ratio", type=float, default=0.3, show_default=True, help="Blocks a sparse head keeps.")
@click.option("--block-size", type=int, default=64, show_default=True)
@click.option("--haystack", type=click.Path(exists=True, path_type=Path),
              help="Text file or folder of *.txt to hide the keys in (default: Paul Graham's essays).")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint file [default: OUT.ckpt].")
@click.option("--checkpoint-every", type=int, default=200, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint.")
@click.option("--log", type=click.Path(path_type=Path), help="JSONL file, one line per step.")
@click.option("--device", help="torch device [default: cuda if available].")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Roles file to write (.json).")
def calibrate_command(
    model: str, target_retrieval: int | None, density: float | None, steps: int, data: str, min_length: int,
    max_length: int, lr: float, seed: int, gate: str, keep_ratio: float, block_size: int, haystack: Path | None,
    checkpoint: Path | None, checkpoint_every: int, resume: bool, log: Path | None, device: str | None, out: Path,
) -> None:
    """Learn which KV heads are retrieval heads (LycheeDecode's HardKuma gates) and write the roles."""
    try:
        roles = calibrate(
            model, target_retrieval=target_retrieval, density=density, steps=steps, data=data,
            min_length=min_length, max_length=max_length, lr=lr, seed=seed, gate=gate,
            checkpoint=None if gate == ATTENTION_MASS else checkpoint or out.with_name(out.name + ".ckpt"),
            checkpoint_every=checkpoint_every, resume=resume, log=log, device=device, haystack=haystack,
            keep_ratio=keep_ratio, block_size=block_size,
        )
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    roles.save(out)
    s = roles.source
    layer0 = roles.retrieval.shape[1]
    line = f"wrote {out}: {roles.num_retrieval - layer0} retrieval units + {layer0} in layer 0"
    line += f", of {roles.retrieval.numel()}"
    if "final_density" in s:
        line += (
            f"; expected density {s['final_density']:.4f} (target {s['target_density']:.4f}), distillation loss "
            f"{s['first_distill']:.4f} -> {s['final_distill']:.4f}, {s['units_above_half']} units with gate mean > 0.5"
        )
    Console(stderr=True).print(line)


if __name__ == "__main__":
    calibrate_command()
