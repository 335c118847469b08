"""The attention-recall diagnostic: the op's observer hook, exact recall of full reads, a hand-computed
sparse case, the report files and input errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from sparsedecode import LLM
from sparsedecode.evals.attention_recall import run_recall, trace_recall
from sparsedecode.evals.cli import eval_command
from sparsedecode.kernels import gather_blocks, sparse_decode
from sparsedecode.kernels.sparse_decode import record_attention_reads, sparse_decode_attention

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BLOCK = 16


@pytest.fixture(scope="module")
def tiny() -> LLM:
    return LLM("random:tiny-llama", device="cpu", block_size=BLOCK)


def prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(1, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_the_hook_sees_the_op_arguments_and_is_unset_afterwards():
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 64, 16)
    lens, lists, counts = torch.tensor([40], dtype=torch.int32), torch.tensor([[[0, 2], [1, 1]]]), torch.ones(1, 2, dtype=torch.int32)
    seen = []
    with record_attention_reads(lambda *args: seen.append(args)):
        sparse_decode_attention(q, k, k, lens, 0.25, BLOCK, lists, counts)
        with pytest.raises(RuntimeError, match="already active"), record_attention_reads(print):
            pass
    assert len(seen) == 1
    (q_seen, k_seen, _, lens_seen, scale, unit, lists_seen, counts_seen, full), = seen
    assert q_seen is q and k_seen is k and lens_seen is lens and lists_seen is lists and counts_seen is counts
    assert (scale, unit, full) == (0.25, BLOCK, None)
    assert sparse_decode._read_observer is None
    with pytest.raises(KeyError), record_attention_reads(lambda *args: seen.append(args)):
        raise KeyError("boom")
    assert sparse_decode._read_observer is None
    sparse_decode_attention(q, k, k, lens, 0.25)
    assert len(seen) == 1


@pytest.mark.parametrize("method, options", [("dense", {}), ("lychee", {"roles": "all", "budget": 32}),
                                             ("lfps", {"budget": 32})])
def test_reading_everything_recalls_exactly_one(tiny, method, options):
    tiny.use_method(method, **options)
    trace = trace_recall(tiny, [prompt(150), prompt(97, seed=1)], steps=3)
    assert trace.recall.shape == (3, 4, 2, 2)
    if method == "lfps":  # step 0 is a refresh: every row full; later steps read candidates only
        assert torch.all(trace.recall[0] == 1) and trace.recall[1:].min() < 1
    else:
        assert torch.all(trace.recall == 1) and torch.all(trace.topk == 1)
    assert len(trace.generations) == 2 and all(len(g.token_ids) == 4 for g in trace.generations)


def test_streaming_recall_equals_a_hand_computation(tiny):
    budget, length, steps = 4 * BLOCK, 150, 3  # the sink block and the 3 newest blocks
    tiny.use_method("streaming", budget=budget, block_size=BLOCK)
    seen = []  # (q, keys) per attention call, step-major
    attend = tiny.method.attend

    def keep(layer, q, pool, batch):
        seen.append((q.clone(), gather_blocks(pool.k[layer], batch.block_tables)))
        return attend(layer, q, pool, batch)

    tiny.method.attend = keep
    trace = trace_recall(tiny, [prompt(length)], steps)
    config = tiny.config
    group = config.num_heads // config.num_kv_heads
    for step in range(steps):
        n = length + step + 1
        blocks = -(-n // BLOCK)
        read = torch.zeros(n, dtype=torch.bool)
        read[:BLOCK] = read[(blocks - 3) * BLOCK:] = True
        for layer in range(config.num_layers):
            q, k = seen[step * config.num_layers + layer]
            for h in range(config.num_kv_heads):
                probs = torch.softmax(q[0, h * group:(h + 1) * group] @ k[0, h, :n].T * tiny.method.scale, dim=-1)
                mass = probs.mean(0)
                assert trace.recall[step, layer, 0, h].item() == pytest.approx(mass[read].sum().item(), abs=1e-6)
                heaviest = torch.nn.functional.pad(mass, (0, blocks * BLOCK - n)).view(blocks, BLOCK).sum(-1)
                assert trace.topk[step, layer, 0, h].item() == pytest.approx(
                    heaviest.topk(4).values.sum().item(), abs=1e-6)
    assert tiny.method.attend is keep  # the diagnostic's wrapper is gone
    assert 0 < trace.recall.min() and trace.recall.max() < 1
    assert torch.all(trace.recall <= trace.topk + 1e-6)


def test_lfps_selected_is_scored_on_its_output_pass(tiny):
    tiny.use_method("lfps", budget=32, attend="selected")
    trace = trace_recall(tiny, [prompt(150)], steps=1)
    # step 0 refreshes: the index pass reads every row fully, the output pass only the top-k
    assert trace.recall.max() < 1


def test_refuses_bad_input(tiny, tmp_path, monkeypatch):
    tiny.use_method("dense")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        trace_recall(tiny, [prompt(50)], steps=0)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        run_recall(tiny, [("dense", {})], [512], 1, 0, 1, tmp_path, steps=0)
    with pytest.raises(ValueError, match="unknown recall task"):
        run_recall(tiny, [("dense", {})], [512], 1, 0, 1, tmp_path, task="qa_1")
    monkeypatch.setattr(type(tiny), "cuda_graphs", property(lambda self: True))  # as on a GPU
    with pytest.raises(ValueError, match="cuda_graphs=False"):
        trace_recall(tiny, [prompt(50)], steps=1)


@pytest.mark.parametrize("arguments, message", [
    (["--methods", "dense,warp"], "unknown method(s) warp"),
    (["--steps", "0"], "--steps"),
    (["--task", "qa_1"], "--task"),
])
def test_cli_input_errors(arguments, message):
    result = CliRunner().invoke(eval_command, ["recall", "--model", "m", "--out", "/tmp/never", *arguments])
    assert result.exit_code != 0
    assert message in result.output


def test_cli_writes_json_markdown_and_heatmaps(tmp_path):
    result = CliRunner().invoke(eval_command, [
        "recall", "--model", "smollm2-135m", "--device", "cpu", "--methods", "dense,streaming", "--lengths", "512",
        "--samples", "2", "--batch-size", "2", "--steps", "2", "--budget", "128", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "recall.json").read_text())
    assert data["task"] == "niah_single_2" and len(data["samples"]) == 2
    dense, streaming = data["results"]
    assert dense["method"] == "dense" and dense["mean"] == dense["min"] == 1.0 and dense["prompts"] == 2
    assert len(dense["recall"]) == 30 and len(dense["recall"][0]) == 3 and dense["steps"] == 2
    assert streaming["method"] == "streaming(budget=128)" and 0 < streaming["min"] <= streaming["mean"] < 1
    assert streaming["kv_fraction_read"] < 0.5
    assert "| dense | 512 | 1.000 | 1.000 | 1.000 | 1.000 |" in result.output
    assert (tmp_path / "recall.md").read_text() in result.output
    for name in ("recall_dense.png", "recall_streaming_budget_128.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
