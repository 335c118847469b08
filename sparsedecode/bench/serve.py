"""Serving benchmark: a load generator against `sparsedecode serve` (or any server of the OpenAI API).

Each request streams a `/v1/completions` of `input_len` prompt tokens and exactly `output_len` output tokens
(`ignore_eos`), with vLLM's `stream_options.continuous_usage_stats` so every chunk says how many tokens
it carries (token counts do not depend on text: random-weight models have none). Per request:
time to first token (TTFT) = send to the first chunk with a token; time per output token (TPOT) = (last
token - first token) / (tokens - 1), as vLLM's benchmark defines them. Per point of the sweep: output
tokens/s and requests/s over the wall time from the first send to the last token; TTFT and TPOT p50 / p99;
the KV fraction read, token-weighted over the requests' usage.

Load: `concurrency` closed-loop clients (each sends its next request when the last one finished), or
open-loop Poisson arrivals at `request_rate` per second. Prompts are token ids, a new one for every request
of a run so that the server's prefix cache never shortens a prefill: windows of the haystack essays
tokenised by the server (`/tokenize`) at distinct offsets, or, for a model without tokenizer, random ids
below `RANDOM_IDS` (present in every supported vocabulary). With `prefix_len`, the first `prefix_len`
tokens are the same in every prompt (one long document, many questions): the untimed warm-up request
prefills them and the prefix cache serves them to every timed request, which prefills only its own tail.
"""
from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.haystack import haystack_text
from .common import _colours, _save_figure, markdown_table, write_atomic

RANDOM_IDS = 1000
WARMUP_TOKENS = 16  # output tokens of the untimed first request of each server: compiles, captures graphs
TABLE_COLUMNS = ("method", "load", "requests", "failed", "output_tok_s", "requests_s", "ttft_p50_ms",
                 "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "kv_fraction_read", "seconds")


@dataclass
class ServeBenchOptions:
    runs: list[tuple[str, dict[str, Any]]]  # (method, options) of each server it starts; unused with `url`
    model: str | None = None  # what the servers it starts serve
    url: str | None = None  # an already running server instead
    api_key: str | None = None
    concurrency: list[int] = field(default_factory=lambda: [1])
    request_rates: list[float] | None = None  # open loop instead of closed-loop clients
    num_prompts: int = 32  # requests per point of the sweep
    input_len: int = 1024
    prefix_len: int = 0  # leading prompt tokens shared by every request
    output_len: int = 256
    haystack: str | None = None
    serve_args: tuple[str, ...] = ()  # more flags of `sparsedecode serve`
    server_timeout: float = 900.0  # seconds to wait for /health of a server it starts
    slo_tpot_ms: float = 50.0
    seed: int = 0


@dataclass
class RequestResult:
    error: str | None = None
    ttft: float | None = None
    tpot: float | None = None
    output_tokens: int = 0
    kv_fraction_read: float | None = None
    finished_at: float = 0.0


# -- servers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launch_server(model: str, method: str, options: dict[str, Any], serve_args: tuple[str, ...], log_path: Path,
                  timeout: float, api_key: str | None = None) -> Iterator[str]:
    """`sparsedecode serve` in a subprocess on 127.0.0.1 and a free port, logging to `log_path`; yields its
    URL once /health answers and stops it on exit."""
    port = free_port()
    command = [sys.executable, "-m", "sparsedecode", "serve", "--model", model, "--method", method,
               *(arg for key, value in options.items() for arg in ("-o", f"{key}={_option_text(value)}")),
               "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning", *serve_args]
    if api_key:
        command += ["--api-key", api_key]
    url = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, timeout, lambda: server.poll() is None, log_path)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_healthy(url: str, timeout: float, running: Callable[[], bool] = lambda: True,
                 log_path: Path | None = None) -> None:
    """Return once `url`/health answers 200; raise if `running()` turns false first (with `log_path`'s tail)
    or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running():
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"the server exited before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer within {timeout:.0f} s")


def _option_text(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _get_json(url: str, api_key: str | None, body: dict[str, Any] | None = None) -> Any:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=600) as response:
        return json.loads(response.read())


# -- prompts ------------------------------------------------------------------------------------
def make_prompts(url: str, api_key: str | None, count: int, length: int, haystack: str | None,
                 seed: int, prefix_len: int = 0) -> list[list[int]]:
    """`count` prompts of `length` token ids. The first `prefix_len` are the same in every prompt; the rest are
    windows of the haystack at distinct offsets where the server has a tokenizer (so no two share a block
    beyond the prefix for the prefix cache to reuse), else random ids."""
    if not 0 <= prefix_len < length:
        raise ValueError(f"the shared prefix ({prefix_len} tokens) must be shorter than the prompt ({length} tokens)")
    rng = random.Random(seed)
    tail = length - prefix_len
    span = length + 4 * count  # the prefix, then tails starting at distinct offsets below 4 * count
    try:
        text = haystack_text(haystack)[: 6 * span]  # ~4 characters a token: enough, without tokenising it all
        ids = _get_json(f"{url}/tokenize", api_key, {"prompt": text})["tokens"]
    except urllib.error.HTTPError as e:
        if e.code != 400:  # 400: the model has no tokenizer
            raise
        ids = np.random.default_rng(seed).integers(RANDOM_IDS, size=(count, tail)).tolist()
        prefix = np.random.default_rng(seed + 1).integers(RANDOM_IDS, size=prefix_len).tolist()
        return [prefix + row for row in ids]
    ids = ids * -(-span // len(ids))  # repeated when the text is shorter than asked
    prefix, rest = ids[:prefix_len], ids[prefix_len:]
    return [prefix + rest[start : start + tail] for start in rng.sample(range(4 * count), count)]


# -- load ---------------------------------------------------------------------------------------
async def _send(client: Any, model: str, prompt: list[int], output_len: int) -> RequestResult:
    result = RequestResult()
    start = time.perf_counter()
    first = last = None
    try:
        # The ids go in extra_body, which is sent as it is: the client's typed parameters are walked item by
        # item (about 1 s of the load generator's CPU per 128K-token prompt, which would delay other requests).
        stream = await client.completions.create(
            model=model, prompt=[], max_tokens=output_len, temperature=0.0, stream=True,
            extra_body={"prompt": prompt, "ignore_eos": True,
                        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        async for chunk in stream:
            if chunk.usage is None or chunk.usage.completion_tokens == result.output_tokens:
                continue
            last = time.perf_counter()
            first = first or last
            result.output_tokens = chunk.usage.completion_tokens
            result.kv_fraction_read = (chunk.usage.model_extra or {}).get("kv_fraction_read")
    except Exception as e:  # a failed request is a row of the table, not the end of the benchmark
        result.error = f"{type(e).__name__}: {e}"
    result.finished_at = time.perf_counter()
    if first is not None:
        result.ttft = first - start
        if result.output_tokens > 1:
            result.tpot = (last - first) / (result.output_tokens - 1)
    return result


async def _closed_loop(send: Callable[[list[int]], Any], prompts: list[list[int]], clients: int) -> list[RequestResult]:
    queue = list(reversed(prompts))
    results: list[RequestResult] = []

    async def client() -> None:
        while queue:
            results.append(await send(queue.pop()))

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


async def _open_loop(send: Callable[[list[int]], Any], prompts: list[list[int]], rate: float,
                     seed: int) -> list[RequestResult]:
    rng = random.Random(seed)
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.ensure_future(send(prompt)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


def run_load(url: str, model: str, prompts: list[list[int]], output_len: int, api_key: str | None,
             concurrency: int | None = None, request_rate: float | None = None, seed: int = 0) -> dict[str, Any]:
    """One point of the sweep: every prompt sent, closed loop (`concurrency`) or open loop (`request_rate`)."""
    from openai import AsyncOpenAI

    async def main() -> tuple[list[RequestResult], float]:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=3600.0)
        async with client:
            send = lambda prompt: _send(client, model, prompt, output_len)  # noqa: E731
            start = time.perf_counter()
            if request_rate is not None:
                results = await _open_loop(send, prompts, request_rate, seed)
            else:
                results = await _closed_loop(send, prompts, concurrency)
            return results, start

    results, start = asyncio.run(main())
    return summarize(results, start)


def summarize(results: list[RequestResult], start: float) -> dict[str, Any]:
    """The row of one point: rates over the wall time from the first send to the last finished request."""
    ok = [r for r in results if r.error is None and r.ttft is not None]
    seconds = max((r.finished_at for r in results), default=start) - start
    tokens = sum(r.output_tokens for r in ok)
    fractions = [(r.kv_fraction_read, r.output_tokens) for r in ok if r.kv_fraction_read is not None]
    ttft = [r.ttft * 1e3 for r in ok]
    tpot = [r.tpot * 1e3 for r in ok if r.tpot is not None]
    return {
        "requests": len(results), "failed": len(results) - len(ok), "output_tokens": tokens, "seconds": seconds,
        "output_tok_s": tokens / seconds if seconds > 0 else None,
        "requests_s": len(ok) / seconds if seconds > 0 else None,
        "ttft_p50_ms": _percentile(ttft, 50), "ttft_p99_ms": _percentile(ttft, 99),
        "tpot_p50_ms": _percentile(tpot, 50), "tpot_p99_ms": _percentile(tpot, 99),
        "kv_fraction_read": (sum(f * n for f, n in fractions) / sum(n for _, n in fractions)
                             if fractions and sum(n for _, n in fractions) else None),
        "first_error": next((r.error for r in results if r.error), None),
    }


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# -- the sweep ----------------------------------------------------------------------------------
def run_serve_bench(opts: ServeBenchOptions, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every run (a server per method and options, or the one at `url`) over the whole sweep; writes
    results.json, results.md and throughput.png to `out` after each point."""
    results: dict[str, Any] = {"meta": {k: v for k, v in asdict(opts).items() if k != "api_key"}, "rows": []}
    if opts.url:
        _bench_server(opts.url.rstrip("/"), None, opts, results, out, log)
        return results
    for i, (method, options) in enumerate(opts.runs):
        with launch_server(opts.model, method, options, opts.serve_args, out / f"server-{i}-{method}.log",
                           opts.server_timeout, opts.api_key) as url:
            _bench_server(url, " ".join(f"{k}={_option_text(v)}" for k, v in options.items()), opts, results,
                          out, log)
    return results


def _bench_server(url: str, options: str | None, opts: ServeBenchOptions, results: dict[str, Any], out: Path,
                  log: Callable[[str], None]) -> None:
    card = _get_json(f"{url}/v1/models", opts.api_key)["data"][0]
    label = " ".join(filter(None, [card.get("method", card["id"]), options]))
    if card.get("max_model_len") and opts.input_len + opts.output_len > card["max_model_len"]:
        raise ValueError(f"input {opts.input_len} + output {opts.output_len} tokens exceed the server's "
                         f"max_model_len {card['max_model_len']}")
    loads = ([("request_rate", r) for r in opts.request_rates] if opts.request_rates
             else [("concurrency", c) for c in opts.concurrency])
    n = opts.num_prompts
    prompts = make_prompts(url, opts.api_key, 1 + n * len(loads), opts.input_len, opts.haystack, opts.seed,
                           opts.prefix_len)
    log(f"{label}: warm-up request")
    run_load(url, card["id"], prompts[:1], min(opts.output_len, WARMUP_TOKENS), opts.api_key, concurrency=1)
    for i, (kind, value) in enumerate(loads):
        row = run_load(url, card["id"], prompts[1 + i * n : 1 + (i + 1) * n], opts.output_len, opts.api_key,
                       seed=opts.seed, **{kind: value})
        row = {"method": label, "model": card["id"], "load": f"{kind}={value:g}", kind: value, **row}
        results["rows"].append(row)
        log(f"{label} {row['load']}: {row['output_tok_s'] or 0:.1f} output tok/s, "
            f"TPOT p99 {row['tpot_p99_ms'] or 0:.1f} ms, {row['failed']} failed"
            + (f" (first error: {row['first_error']})" if row["failed"] else ""))
        write_results(results, out)


def best_under_slo(rows: list[dict[str, Any]], slo_tpot_ms: float) -> list[dict[str, Any]]:
    """Per method the highest output tokens/s of a point whose p99 TPOT is within the SLO."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["tpot_p99_ms"] is not None and row["tpot_p99_ms"] <= slo_tpot_ms and not row["failed"]:
            if row["method"] not in best or row["output_tok_s"] > best[row["method"]]["output_tok_s"]:
                best[row["method"]] = row
    return [{"method": m, "load": r["load"], "output_tok_s": r["output_tok_s"], "tpot_p99_ms": r["tpot_p99_ms"]}
            for m, r in best.items()]


def results_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    slo = meta["slo_tpot_ms"]
    best = best_under_slo(results["rows"], slo)
    parts = [
        "# sparsedecode serving benchmark",
        f"{meta['model'] or 'the server at ' + meta['url']}: {meta['num_prompts']} requests per point, prompts of "
        f"{meta['input_len']} tokens"
        + (f" (the first {meta['prefix_len']} the same in every prompt)" if meta.get("prefix_len") else "")
        + f", outputs of {meta['output_len']} tokens (ignore_eos). Times in ms; "
        "TPOT = (last token - first token) / (tokens - 1); kv_fraction_read = KV-cache bytes read over dense's.",
        markdown_table(results["rows"], TABLE_COLUMNS),
        f"## Highest output tokens/s with p99 TPOT under {slo:g} ms",
        markdown_table(best) if best else "(no point met it)",
    ]
    return "\n\n".join(parts) + "\n"


def plot_throughput(rows: list[dict[str, Any]], path: Path) -> None:
    """Output tokens/s against concurrency (or request rate), one line per method."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    x_key = "request_rate" if any("request_rate" in r for r in rows) else "concurrency"
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    colours = _colours(rows)
    for method, colour in colours.items():
        series = sorted((r for r in rows if r["method"] == method and r["output_tok_s"] is not None),
                        key=lambda r: r[x_key])
        ax.plot([r[x_key] for r in series], [r["output_tok_s"] for r in series], "o-", color=colour, label=method)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("request rate (1/s)" if x_key == "request_rate" else "concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title("serving throughput")
    _save_figure(fig, path)


def write_results(results: dict[str, Any], out: Path) -> None:
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    write_atomic(out / "results.md", results_markdown(results))
    if results["rows"]:
        plot_throughput(results["rows"], out / "throughput.png")
