"""`sparsedecode bench serve` against a live `sparsedecode serve` subprocess (smollm2-135m on CPU): its table
is computed from the requests it really timed, and agrees with the server's own counters, prefix-cache hits
included."""
from __future__ import annotations

import json
import re

import httpx2
import pytest
from click.testing import CliRunner

from sparsedecode.bench.cli import bench_group
from sparsedecode.bench.serve import WARMUP_TOKENS, launch_server

pytestmark = pytest.mark.slow  # real model weights

OUTPUT_LEN = 4
PROMPTS = 4


def counters(url: str) -> dict[str, float]:
    text = httpx2.get(f"{url}/metrics").text
    return {name: sum(float(v) for v in re.findall(rf"^sparsedecode:{name}{{[^}}]*}} (\S+)$", text, re.M))
            for name in ("generation_tokens_total", "request_success_total", "time_to_first_token_seconds_count",
                         "prefix_cache_hits_total")}


def test_bench_serve_against_a_live_server(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server's torch: one thread is fastest on a busy machine
    # engine flags away from their defaults: 64-token prompts prefilled in two chunks, two decode steps per
    # engine step (chunks carrying two tokens)
    serve_args = ("--device", "cpu", "--max-model-len", "512", "--max-num-seqs", "4", "--max-num-batched-tokens",
                  "32", "--num-scheduler-steps", "2")
    with launch_server("smollm2-135m", "dense", {}, serve_args, tmp_path / "server.log", 300) as url:
        result = CliRunner().invoke(bench_group, [
            "serve", "--url", url, "--concurrency", "1,2", "--num-prompts", str(PROMPTS), "--input-len", "64",
            "--output-len", str(OUTPUT_LEN), "--out", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
        served = counters(url)
        # then every prompt starts with the same 128 tokens (two blocks of 64) and has 32 of its own
        shared = CliRunner().invoke(bench_group, [
            "serve", "--url", url, "--concurrency", "2", "--num-prompts", str(PROMPTS), "--input-len", "160",
            "--prefix-len", "128", "--output-len", str(OUTPUT_LEN), "--out", str(tmp_path / "shared")])
        assert shared.exit_code == 0, shared.output
        hits = counters(url)["prefix_cache_hits_total"] - served["prefix_cache_hits_total"]

    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r in rows:
        assert r["method"] == "dense" and r["requests"] == PROMPTS and r["failed"] == 0
        assert r["output_tokens"] == PROMPTS * OUTPUT_LEN
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["seconds"])
        assert r["requests_s"] == pytest.approx(PROMPTS / r["seconds"])
        # every request's times lie inside the point's wall time
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] <= r["seconds"] * 1e3
        assert 0 < r["tpot_p50_ms"] <= r["tpot_p99_ms"] and r["tpot_p99_ms"] * (OUTPUT_LEN - 1) < r["seconds"] * 1e3
        assert r["kv_fraction_read"] == pytest.approx(1.0)  # dense reads the whole cache
    # the server saw exactly the requests and tokens the table counts, plus the warm-up request
    warmup = min(OUTPUT_LEN, WARMUP_TOKENS)
    assert served["generation_tokens_total"] == sum(r["output_tokens"] for r in rows) + warmup
    assert served["request_success_total"] == served["time_to_first_token_seconds_count"] == 2 * PROMPTS + 1
    assert served["prefix_cache_hits_total"] == 0  # distinct prompts: no prefill shortened
    # the warm-up request prefilled the shared prefix; every timed request took it from the cache (the warm-up
    # itself may find the first block among the distinct windows above, which start at offsets 0-35)
    assert PROMPTS * 128 <= hits <= PROMPTS * 128 + 64
    assert "(the first 128 the same in every prompt)" in (tmp_path / "shared" / "results.md").read_text()

    table = (tmp_path / "out" / "results.md").read_text()
    assert "| method | load | requests | failed | output_tok_s | requests_s | ttft_p50_ms" in table
    assert "| dense | concurrency=2 | 4 | 0 |" in table and "p99 TPOT under 50 ms" in table
    assert (tmp_path / "out" / "throughput.png").read_bytes().startswith(b"\x89PNG")


def test_bench_serve_needs_a_model_or_a_url() -> None:
    result = CliRunner().invoke(bench_group, ["serve"])
    assert result.exit_code == 2 and "--model" in result.output and "--url" in result.output


def test_bench_serve_refuses_a_prefix_as_long_as_the_prompt() -> None:
    result = CliRunner().invoke(bench_group, ["serve", "--url", "http://127.0.0.1:9", "--input-len", "4k",
                                              "--prefix-len", "4k"])
    assert result.exit_code == 2 and "--prefix-len" in result.output and "shorter than --input-len" in result.output


class _TokenizeServer:
    """A stand-in server for `make_prompts`: /tokenize answers with the words' positions as token ids, or
    with 400 (a model without tokenizer)."""

    def __init__(self, has_tokenizer: bool) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, reply = ((200, {"tokens": list(range(len(body["prompt"].split())))}) if has_tokenizer
                                 else (400, {"error": {"message": "no tokenizer"}}))
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("has_tokenizer", [True, False])
def test_prompts_share_exactly_their_prefix(has_tokenizer: bool) -> None:
    from sparsedecode.bench.serve import RANDOM_IDS, make_prompts

    count, length, prefix = 6, 300, 200
    with _TokenizeServer(has_tokenizer) as url:
        prompts = make_prompts(url, None, count, length, None, seed=3, prefix_len=prefix)
        alone = make_prompts(url, None, count, length, None, seed=3)
    for batch, shared in ((prompts, prefix), (alone, 0)):
        assert len(batch) == count and all(len(p) == length for p in batch)
        assert all(p[:shared] == batch[0][:shared] for p in batch)
        firsts = {tuple(p[shared : shared + 8]) for p in batch}  # what follows the prefix differs in every prompt
        assert len(firsts) == count
    if not has_tokenizer:
        assert all(0 <= t < RANDOM_IDS for p in prompts for t in p)
    with pytest.raises(ValueError, match="shorter than the prompt"):
        make_prompts("http://127.0.0.1:9", None, count, length, None, seed=3, prefix_len=length)
