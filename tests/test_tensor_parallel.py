"""Tensor parallelism on CPU (gloo): a model split over two processes, the engine's own worker beside this
one, decodes the tokens one process decodes. On real weights (qwen2.5-coder-0.5b: 2 KV heads, 14 query
heads, one KV head per process) for dense, for lychee with its shipped roles at a budget that makes it
select, and for seeded sampling; the benchmarks' paths (`bench engine-check` parity over three processes,
`bench e2e` with per-GPU bytes); the workers exit with the LLM and when its process dies; a size that does
not divide the KV heads is refused before anything loads."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsedecode import LLM
from sparsedecode.bench import e2e, engine_check

MODEL = "qwen2.5-coder-0.5b"
OPTIONS = dict(device="cpu", dtype="float32", block_size=16, max_context=512, prefill_chunk=64, max_num_seqs=4,
               num_blocks=48)
NEW_TOKENS = 10
LYCHEE = dict(budget=64)  # 4 blocks of 16 (sink, local and 2 chosen) of prompts 11 and 17 blocks long


def prompts_for(llm: LLM) -> list[list[int]]:
    rooms = ["kitchen", "attic", "cellar", "library", "garden", "study", "hall", "pantry", "chapel", "tower",
             "stable", "vault", "gallery", "nursery", "armoury", "bakery", "forge", "cloister", "loft", "porch"]
    text = " ".join(f"The key to the {room} is hidden under stone number {(37 * i) % 101}." for i, room in
                    enumerate(rooms))
    ids = llm.tokenizer(f"{text} Now recall: the key to the attic is hidden under stone number").input_ids
    return [ids[-170:], ids[:120] + ids[-150:]]  # several prefill chunks each, prefilled and decoded together


def decode_all(llm: LLM) -> dict[str, list]:
    prompts = prompts_for(llm)

    def generate(**sampling) -> list:
        return llm.generate(prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=[], **sampling)

    llm.use_method("dense")
    runs = {"dense": [g.token_ids for g in generate()]}
    llm.use_method("lychee", **LYCHEE)
    lychee = generate()
    runs["lychee"] = [g.token_ids for g in lychee]
    runs["lychee kv fraction"] = [g.kv_fraction_read for g in lychee]
    runs["lychee sampled"] = [g.token_ids for g in generate(temperature=0.8, seed=3)]
    return runs


@pytest.mark.slow  # real model weights
def test_two_processes_decode_the_tokens_of_one() -> None:
    with LLM(MODEL, **OPTIONS) as one:
        expected = decode_all(one)
    with LLM(MODEL, tensor_parallel_size=2, **OPTIONS) as two:
        assert two.engine.runner.pool.num_kv_heads == 1  # this process holds one of the two KV heads
        assert two.engine.capture_decode_steps() == []  # every rank takes the call (no graphs on a CPU)
        got = decode_all(two)
        workers = two.workers.processes
    assert got == expected
    assert max(expected["lychee kv fraction"]) < 0.6  # lychee selected: its sparse heads read 64 of 170+ tokens
    assert expected["lychee"] != expected["dense"]
    assert not any(w.is_alive() for w in workers)


@pytest.mark.slow  # real model weights
def test_engine_check_parity_over_three_processes() -> None:
    """`bench engine-check --tensor-parallel-size`: arriving requests served by smollm2-135m (3 KV heads) split
    over three processes against served by one, for each of its methods."""
    opts = engine_check.ParityOptions(model="smollm2-135m", requests=3, min_len=40, max_len=300, min_new_tokens=3,
                                      max_new_tokens=8, max_num_seqs=2, decode_steps=2, sparse_budget=64,
                                      device="cpu", tensor_parallel_size=3)
    rows = engine_check.run_parity(opts, log=lambda message: None)
    summary = engine_check.parity_summary(rows)
    assert [s["method"] for s in summary] == ["dense", "lychee, roles all", "lychee+lfps"]
    assert all(s["requests"] == s["same_tokens"] == 3 and s["ran_together"] == 2 for s in summary)


def test_engine_check_refuses_a_tensor_parallel_parity_of_random_weights() -> None:
    with pytest.raises(ValueError, match="random weights differ from load to load"):
        engine_check.ParityOptions(tensor_parallel_size=2)


@pytest.mark.slow  # spawns worker processes
def test_e2e_benchmark_over_two_processes_counts_bytes_per_gpu() -> None:
    """The benchmark's path through the engine on two processes (a benchmark-only method, sdpa, rebuilt in the
    worker from its class; lfps's two kinds of step), with each GPU's bytes: half the weights and KV reads."""
    shared = dict(models=["random:tiny-llama"], contexts=[256], batches=[1], methods=["sdpa", "lychee+lfps"],
                  budget=64, roles="random:2", steps=2, warmup=1, hf_modes=("eager",), hf_random_shapes=True,
                  device="cpu", num_blocks=16)
    one = e2e.run_e2e(e2e.E2EOptions(**shared), log=lambda message: None)
    two = e2e.run_e2e(e2e.E2EOptions(**shared, tensor_parallel_size=2), log=lambda message: None)
    assert [r["method"] for r in two["rows"]] == [r["method"] for r in one["rows"]] == ["dense", "sdpa", "lychee+lfps"]
    for a, b in zip(one["rows"], two["rows"]):
        assert (a["gpus"], b["gpus"]) == (1, 2) and b["ms"] > 0
        assert b["kv_rows"] == a["kv_rows"]  # the whole model's reads
        assert b["bytes_per_step"] == pytest.approx(a["bytes_per_step"] / 2)
        assert b["ceiling"] == pytest.approx(a["ceiling"])
    assert any("transformers baseline skipped" in n for n in two["notes"]) and not two["hf"]
    assert "| model | GPUs | ctx |" in e2e.results_markdown(two)
    assert "| model | ctx |" in e2e.results_markdown(one)  # one GPU: no GPUs column


def test_kv_heads_that_do_not_divide_are_refused_before_loading() -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide this model's num_kv_heads=2 "
                                         r".*sizes that work: 1, 2$"):
        LLM("random:tiny-llama", device="cpu", tensor_parallel_size=3)


ENGINE_THAT_DIES = """
import os
from sparsedecode import LLM
from sparsedecode.bench import e2e, engine_check

if __name__ == "__main__":
    llm = LLM("random:tiny-llama", device="cpu", dtype="float32", max_context=256, block_size=16, num_blocks=32,
              max_num_seqs=2, tensor_parallel_size=2)
    llm.generate([[1, 2, 3]], max_new_tokens=2)
    print(*(w.pid for w in llm.workers.processes), flush=True)
    os._exit(0)  # no close, no finalizer, no atexit: as if killed
"""


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (an orphan's reaper may be slow or absent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow  # spawns an engine and its workers
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_the_engine_process_dies(tmp_path) -> None:
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_THAT_DIES)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    pids = [int(p) for p in result.stdout.split()]
    assert pids
    deadline = time.monotonic() + 30
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(running(p) for p in pids)
