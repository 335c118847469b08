"""The offload measurements on the CPU (host and device one memory): what `sparsedecode bench offload`,
`offload-hits` and `offload-serve` report, on tiny models; their speed is a GPU matter."""
from __future__ import annotations

import pytest
import torch

from sparsedecode.bench import lfps_bench
from sparsedecode.offload import OffloadConfig
from sparsedecode.offload.scoring import torch_threads

SELECTED = dict(attend="selected", budget=128)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread."""
    with torch_threads(1):
        yield


def test_hot_keys_keep_the_top_k_where_random_keys_move_it() -> None:
    """Random K/V: the top-k moves from step to step, so the pool misses; hot blocks: the same top-k, so
    the complete blocks a default step reads are already staged. Then the on-device pool's steps."""
    hit_rates = {}
    for fill in ("random", "hot"):
        torch.manual_seed(0)
        # a top-k of 16 of the 256 blocks, in 24 slots
        rows, setup = lfps_bench.run_offload("random:tiny-llama", 16384, 12, "cpu", dict(attend="selected", budget=1024),
                                             OffloadConfig(index="gpu", pool_blocks=24), fill, on_gpu=fill == "hot")
        kinds = {(r["pool"], r["kind"]): r for r in rows}
        default = kinds["offloaded", "default"]
        assert default["steps"] == 12 and default["link_mb"] > 0 and not setup["graphs"]
        hit_rates[fill] = default["hit_rate"]
    assert hit_rates["hot"] > 0.99 > hit_rates["random"]  # hot: a miss at most as the newest block completes
    assert kinds["on-GPU", "default"]["step_ms"] > 0 and "hit_rate" not in kinds["on-GPU", "default"]


def test_serving_holds_twice_the_sequences_dense_holds() -> None:
    rows = lfps_bench.run_offload_serving("random:tiny-llama", 1024, 4, SELECTED, pool_blocks=8, device="cpu",
                                          max_dense=4)
    dense = [r for r in rows if r["pool"] == "dense"]
    offloaded = [r for r in rows if r["pool"] == "offloaded"]
    assert [r["sequences"] for r in dense] == [1, 2, 4]
    assert [(r["fill"], r["sequences"]) for r in offloaded] == [("random", 8), ("hot", 8)]
    assert all(r["tokens_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_hit_rate_on_real_prompts() -> None:
    rows = lfps_bench.run_offload_hits("smollm2-135m", [1024], (4,), 4, dict(attend="selected", budget=128),
                                       OffloadConfig(index="gpu"), ruler_tasks=("vt",), device="cpu")
    assert {r["prompt"] for r in rows} == {"needle", "vt", "random K/V"}
    assert all(r["hit_rate"] is not None and 0 <= r["hit_rate"] <= 1 for r in rows)
    assert {r["kind"] for r in rows} == {"default", "refresh"}
