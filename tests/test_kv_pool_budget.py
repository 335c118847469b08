"""How much GPU memory a process gives its KV pool (`kv_pool_budget_bytes`), and bad shares refused."""
import pytest

from sparsedecode.core import kv_pool_budget_bytes
from sparsedecode.engine import LLM

GiB = 2**30


def test_one_process_takes_its_share_less_weights_and_transients():
    assert kv_pool_budget_bytes(100 * GiB, 95 * GiB, 10 * GiB, 5 * GiB, 0.9) == 75 * GiB


def test_two_processes_at_045_get_the_same_pool_in_either_order():
    # 0.45 of 100 GiB is each one's share; the other process holds 45 GiB plus its context when the second starts
    first = kv_pool_budget_bytes(100 * GiB, 95 * GiB, 10 * GiB, 5 * GiB, 0.45)
    second = kv_pool_budget_bytes(100 * GiB, 49 * GiB, 10 * GiB, 5 * GiB, 0.45)
    assert first == second == 30 * GiB


def test_never_more_than_is_free():
    # another process holds half the GPU: a 0.9 share is cut to what is free, less the transients
    assert kv_pool_budget_bytes(100 * GiB, 50 * GiB, 10 * GiB, 5 * GiB, 0.9) == 45 * GiB


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_a_share_outside_0_1_is_refused(share):
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        kv_pool_budget_bytes(100 * GiB, 95 * GiB, 10 * GiB, 5 * GiB, share)
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        LLM("random:tiny-llama", device="cpu", max_context=512, gpu_memory_utilization=share)
