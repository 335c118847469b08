"""Where a decode step of transformers' model inside `sparsedecode.hf.sparse_decoding` spends its time,
per method: on the host (the forward call until it returns), on the device (kernel time), and in the
calls that make the host wait for the device.

    sparsedecode bench hf --profile --models qwen2.5-coder-1.5b --contexts 32000 \\
        --methods dense,lychee,lychee+lfps --out out/hf-profile

Batch 1, the prompt prefilled once per method, then decode steps as `generate` makes them (one token,
the attention mask grown by one), each followed by a device synchronisation: `step ms` is the median
step, `host ms` the median time until the forward call returns. Over `profile_steps` more steps the
PyTorch profiler counts, per step, kernel launches, the CUDA calls that block the host
(synchronisations, copies), stream waits, host reads of tensors (`aten::_local_scalar_dense`,
`aten::nonzero`) and Triton compilations (kernel-cache misses), and lists the kernels by device time.
Over `profile_steps` steps more, Python's cProfile lists the Python functions of the package, Triton and
transformers by self time (the function's own code, tensor operators written inline included, not the
functions it calls) with their inclusive time; its tracing slows them, so compare methods with each
other, not with `host ms`. A step whose host ms is near its step ms is bound by the host; blocking calls
with long host time are syncs that wait for queued device work.
"""
from __future__ import annotations

import cProfile
import json
import pstats
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import triton
from transformers import DynamicCache

from ..hf import cache_keyword, sparse_decoding
from ..models.loader import default_device, default_dtype, load_model
from ..models.shapes import RANDOM_PREFIX
from .common import device_name, markdown_table, prompts, synchronize, write_atomic
from .e2e import hf_model_like, method_options
from .hf_bench import check_positions

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
            "cudaMemcpyAsync", "cuMemcpyDtoH_v2", "cuMemcpyDtoHAsync_v2", "cudaStreamQuery")
STREAM_WAITS = ("cudaStreamWaitEvent", "cudaEventRecord", "cudaEventRecordWithFlags")
HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero")
WARMUP_STEPS = 3  # decode steps before the timed ones
TOP_KERNELS = 8
TOP_FUNCTIONS = 16
#: the Python functions listed by host time: the package's (this benchmark's aside), Triton's launchers and
#: transformers' model code
TRACED = ("sparsedecode/", "triton/", "transformers/")
COLUMNS = ["method", "step ms", "host ms", "device ms", "launches", "blocking calls", "blocking ms",
           "stream waits", "host reads", "compiles", "KV read"]


def decode_inputs(tokens: torch.Tensor, width: int) -> dict[str, Any]:
    """The forward arguments `generate` gives a decode step of one row (no padding) at `width` tokens."""
    device = tokens.device
    return {"input_ids": tokens, "attention_mask": torch.ones(1, width + 1, dtype=torch.long, device=device),
            "position_ids": torch.tensor([[width]], device=device), "cache_position": torch.tensor([width], device=device)}


def profile_method(hf: torch.nn.Module, ids: torch.Tensor, method: str, options: dict[str, Any], steps: int,
                   profile_steps: int) -> dict[str, Any]:
    device = ids.device
    compiles: list[str] = []

    def count_compile(*args: Any, **kwargs: Any) -> bool:
        compiles.append(getattr(kwargs.get("fn"), "name", "?"))
        return False  # compile as usual

    key = cache_keyword(hf)
    with torch.no_grad(), sparse_decoding(hf, method=method, **options) as sd:
        out = hf(input_ids=ids, **{key: DynamicCache()}, use_cache=True, logits_to_keep=1)
        cache, width = getattr(out, key), ids.shape[1]
        step_s, host_s = [], []

        def step() -> None:
            nonlocal out, width
            start = time.perf_counter()
            out = hf(**decode_inputs(out.logits[:, -1:].argmax(-1), width), **{key: cache}, use_cache=True)
            host_s.append(time.perf_counter() - start)
            synchronize(device)
            step_s.append(time.perf_counter() - start)
            width += 1

        for _ in range(WARMUP_STEPS):  # the first decode step takes the slots; compiles and scratch buffers
            step()
        step_s.clear()
        host_s.clear()
        for _ in range(steps):
            step()
        triton.knobs.runtime.jit_cache_hook = count_compile
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                              if device.type == "cuda" else [])
        try:
            with torch.profiler.profile(activities=activities, with_stack=True) as prof:
                for _ in range(profile_steps):
                    step()
        finally:
            triton.knobs.runtime.jit_cache_hook = None
        python = cProfile.Profile()
        with python:
            for _ in range(profile_steps):
                step()
        fraction = sd.kv_fraction_read
    calls: Counter[str] = Counter()
    host_us: Counter[str] = Counter()
    kernels: Counter[str] = Counter()
    for e in prof.key_averages():
        calls[e.key] += e.count
        host_us[e.key] += e.cpu_time_total
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.key] += e.self_device_time_total

    def per_step(names: tuple[str, ...], counter: Counter[str]) -> float:
        return sum(counter[n] for n in names) / profile_steps

    return {
        "method": method, "step ms": statistics.median(step_s) * 1e3, "host ms": statistics.median(host_s) * 1e3,
        "device ms": sum(kernels.values()) / 1e3 / profile_steps, "launches": per_step(LAUNCHES, calls),
        "blocking calls": per_step(BLOCKING, calls), "blocking ms": per_step(BLOCKING, host_us) / 1e3,
        "stream waits": per_step(STREAM_WAITS, calls), "host reads": per_step(HOST_READS, calls),
        "compiles": len(compiles), "KV read": fraction,
        "blocking": {n: calls[n] / profile_steps for n in BLOCKING if calls[n]},
        "compiled": sorted(set(compiles)),
        "kernels": [(name, us / 1e3 / profile_steps) for name, us in kernels.most_common(TOP_KERNELS)],
        "functions": python_functions(python, profile_steps),
    }


def python_functions(profile: cProfile.Profile, steps: int) -> list[tuple[str, float, float, float]]:
    """The traced Python functions of a cProfile run by self time: (function, self ms, inclusive ms,
    calls), each per step."""
    rows = []
    for (filename, line, name), (_, calls, self_s, inclusive_s, _) in pstats.Stats(profile).stats.items():
        path = filename.replace("\\", "/")
        starts = [path.rfind(t) for t in TRACED if t in path]
        if starts and "sparsedecode/bench/" not in path:
            rows.append((f"{path[min(starts):]}({line}): {name}", self_s * 1e3 / steps, inclusive_s * 1e3 / steps,
                         calls / steps))
    return sorted(rows, key=lambda r: -r[1])[:TOP_FUNCTIONS]


def run_hf_profile(model: str, context: int, methods: list[str], budget: int, roles: str | None, steps: int,
                   profile_steps: int, out: Path, device: str | None = None) -> list[dict[str, Any]]:
    dev = torch.device(device) if device else default_device()
    loaded = load_model(model, dev, default_dtype(dev))
    hf = hf_model_like(loaded.model)
    check_positions(model, loaded.config, context, 1 + WARMUP_STEPS + steps + 2 * profile_steps)
    ids = torch.tensor(prompts(loaded.tokenizer, loaded.config.vocab_size, context, 1), device=dev)
    real = not model.startswith(RANDOM_PREFIX)
    rows = [profile_method(hf, ids, m, method_options(m, budget, roles, real), steps, profile_steps) for m in methods]
    meta = {"device": device_name(dev), "torch": torch.__version__,
            "model": model, "context": context, "budget": budget, "steps": steps, "profile_steps": profile_steps}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = [f"# decode steps inside sparse_decoding: {model}, {context} tokens, batch 1\n",
            (f"{meta['device']}, torch {meta['torch']}, budget {budget}; step and host ms: median of {steps} steps; "
             f"the rest per step over {profile_steps} profiled steps.\n"), markdown_table(rows, COLUMNS)]
    for row in rows:
        text.append(f"\n## {row['method']}\n\nblocking calls per step: {row['blocking'] or 'none'}; "
                    f"Triton compilations: {row['compiled'] or 'none'}\n")
        text.append(markdown_table([{"kernel": name[:90], "device ms/step": ms} for name, ms in row["kernels"]]))
        text.append("\n" + markdown_table([{"Python function": name, "self ms/step": own, "inclusive ms/step": ms,
                                            "calls/step": n} for name, own, ms, n in row["functions"]]))
    write_atomic(out / "results.md", "\n".join(text) + "\n")
    print("\n".join(text))
    return rows
