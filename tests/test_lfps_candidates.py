"""The one-launch Triton LFPS candidate lists against the PyTorch reference (`methods.lfps.lfps_candidates`).

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (see triton_cpu); with CUDA the
same cases also run the compiled kernel on the GPU. Lists and counts are integers: they must be equal.
The output buffers and the bitmap start with garbage, and the previous lists hold garbage after their
counts, so the kernel must write every slot and read only the valid entries. Decoding with lfps and
lychee+lfps through the kernels (the CUDA dispatch, here in the interpreter) must match the PyTorch path.
"""
import importlib

import torch

from triton_cpu import devices, fix_interpreter, interpreted, run_in_fresh_process  # sets TRITON_INTERPRET

import pytest  # noqa: E402

from recording import generate_recording  # noqa: E402
from sparsedecode import LLM  # noqa: E402
from sparsedecode.kernels import lfps_candidates_into  # noqa: E402
from sparsedecode.methods.lfps import PastSelection, candidate_offsets, lfps_candidates  # noqa: E402
from sparsedecode.core.selection import BlockSelector  # noqa: E402

INTERPRET = interpreted(importlib.import_module("sparsedecode.kernels.lfps_candidates")._lfps_candidates_kernel)
NEEDS_FRESH_PROCESS = not INTERPRET and not torch.cuda.is_available()
if INTERPRET:
    fix_interpreter()
DEVICES = devices(INTERPRET)

BLOCK = 16


def make_case(seed: int, num_blocks: int, kept: int, handed: bool) -> dict:
    """Reference arguments: batch 1-3 with ragged lengths (1 token, a partial block, whole blocks, the full
    capacity), previous counts 0..K of ascending valid blocks followed by garbage, and with `handed` a
    row mask and a handed selection (copied as it is, garbage included)."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads = int(torch.randint(1, 4, (), generator=gen)), 3
    capacity = num_blocks * BLOCK
    choices = [1, int(torch.randint(2, capacity, (), generator=gen)), BLOCK * int(torch.randint(1, num_blocks, (),
               generator=gen)), capacity]
    lens = [choices[int(i)] for i in torch.randint(0, len(choices), (batch,), generator=gen)]
    blocks = torch.randint(-3, num_blocks + 4, (batch, heads, kept), generator=gen, dtype=torch.int32)
    counts = torch.randint(0, kept + 1, (batch, heads), generator=gen, dtype=torch.int32)
    for b in range(batch):
        held = -(-lens[b] // BLOCK)
        for h in range(heads):
            n = min(int(counts[b, h]), held)
            counts[b, h] = n
            blocks[b, h, :n] = torch.randperm(held, generator=gen)[:n].sort().values
    case = dict(blocks=blocks, counts=counts, seq_lens=torch.tensor(lens, dtype=torch.int32), block_size=BLOCK,
                num_blocks=num_blocks)
    if handed:
        case.update(rows=torch.rand(batch, heads, generator=gen) < 0.5,
                    handed_blocks=torch.randint(0, num_blocks + 1, (batch, heads, kept), generator=gen,
                                                dtype=torch.int32),
                    handed_counts=torch.randint(0, kept + 1, (batch, heads), generator=gen, dtype=torch.int32))
    return case


def check_case(device: str, case: dict, expand: int, sink: int, local: int) -> None:
    offsets = torch.tensor(candidate_offsets(expand))
    want_blocks, want_counts = lfps_candidates(offsets=offsets, sink_blocks=sink, local_blocks=local, **case)
    batch, heads, width = want_blocks.shape
    gen = torch.Generator().manual_seed(width)
    out_blocks = torch.randint(-9, 99, (batch, heads, width), generator=gen, dtype=torch.int32).to(device)
    out_counts = torch.randint(-9, 99, (batch, heads), generator=gen, dtype=torch.int32).to(device)
    bitmap = torch.randint(0, 2, (batch, heads, case["num_blocks"]), generator=gen, dtype=torch.int8).to(device)
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    lfps_candidates_into(offsets=offsets.to(device), sink_blocks=sink, local_blocks=local, out_blocks=out_blocks,
                         out_counts=out_counts, bitmap=bitmap, **on_device)
    assert torch.equal(out_counts.cpu(), want_counts)
    assert torch.equal(out_blocks.cpu(), want_blocks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("handed", [False, True])
@pytest.mark.parametrize("expand", [0, 1, 2])
def test_matches_reference(device: str, expand: int, handed: bool) -> None:
    for seed in range(9):  # sink and local 0-2 each, over shapes of 8-70 blocks and K of 1-8
        gen = torch.Generator().manual_seed(100 * expand + seed)
        num_blocks, kept = int(torch.randint(8, 71, (), generator=gen)), int(torch.randint(1, 9, (), generator=gen))
        case = make_case(100 * expand + seed, num_blocks, kept, handed)
        check_case(device, case, expand, sink=seed % 3, local=seed // 3)


@pytest.mark.parametrize("device", DEVICES)
def test_many_blocks(device: str) -> None:
    """More blocks than one chunk of the bitmap (1024): the slots carry over from chunk to chunk."""
    for seed in range(3):
        check_case(device, make_case(seed, 2600, 64, handed=seed == 2), expand=1, sink=1, local=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_graph_replay_follows_new_selections_and_lengths() -> None:
    case = make_case(7, 40, 6, handed=True)
    on = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    options = dict(offsets=torch.tensor(candidate_offsets(1), device="cuda"), sink_blocks=1, local_blocks=1)
    batch, heads, kept = case["blocks"].shape
    out_blocks = torch.zeros(batch, heads, kept * 3 + 2, dtype=torch.int32, device="cuda")
    out_counts = torch.zeros(batch, heads, dtype=torch.int32, device="cuda")
    bitmap = torch.zeros(batch, heads, 40, dtype=torch.int8, device="cuda")

    def call() -> None:
        lfps_candidates_into(out_blocks=out_blocks, out_counts=out_counts, bitmap=bitmap, **options, **on)

    call()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    gen = torch.Generator().manual_seed(1)
    on["blocks"].copy_(torch.randint(-3, 44, (batch, heads, kept), generator=gen, dtype=torch.int32))
    on["counts"].copy_(torch.randint(0, kept + 1, (batch, heads), generator=gen, dtype=torch.int32))
    on["seq_lens"].copy_(case["seq_lens"].flip(0))
    on["rows"].logical_not_()
    graph.replay()
    want_blocks, want_counts = lfps_candidates(**options, **on)
    assert torch.equal(out_blocks, want_blocks) and torch.equal(out_counts, want_counts)


@pytest.fixture(scope="module")
def tiny() -> LLM:
    torch.manual_seed(0)
    return LLM("random:tiny-llama", device="cpu", block_size=16)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 before triton")
@pytest.mark.parametrize("method,options", [
    ("lfps", dict(budget=128, refresh_every=4)),
    ("lfps", dict(budget=128, refresh_every=4, attend="selected", refresh_threshold=0.5)),
    ("lychee+lfps", dict(roles="random:3", budget=64, refresh_every=4)),
])
def test_decoding_through_the_kernels(tiny: LLM, monkeypatch: pytest.MonkeyPatch, method: str, options: dict) -> None:
    """The CUDA dispatch (candidate kernel into the planned buffers, selection kernel into views of the
    state) run in the interpreter decodes exactly like the CPU's PyTorch path."""
    prompt = [(7 * i) % 500 + 1 for i in range(700)]
    tiny.use_method(method, **options)
    want = generate_recording(tiny, prompt, 8)
    monkeypatch.setattr(PastSelection, "uses_kernel", staticmethod(lambda device: True))
    monkeypatch.setattr(BlockSelector, "uses_kernel", lambda self, device, num_blocks: True)
    tiny.use_method(method, **options)
    tokens, outputs = generate_recording(tiny, prompt, 8)
    assert tokens == want[0]
    assert all(torch.equal(a, b) for a, b in zip(outputs, want[1], strict=True))


def test_rejects_bad_shapes() -> None:
    blocks, counts = torch.zeros(1, 2, 4, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32)
    offsets, lens = torch.tensor([0, 1]), torch.tensor([64])
    bitmap = torch.zeros(1, 2, 8, dtype=torch.int8)
    common = dict(block_size=16, offsets=offsets, sink_blocks=1, local_blocks=1, num_blocks=8, bitmap=bitmap,
                  out_counts=counts.clone())
    with pytest.raises(ValueError, match="out_blocks must be"):
        lfps_candidates_into(blocks, counts, lens, out_blocks=torch.zeros(1, 2, 9, dtype=torch.int32), **common)
    with pytest.raises(ValueError, match="go together"):
        lfps_candidates_into(blocks, counts, lens, rows=torch.ones(1, 2, dtype=torch.bool),
                             out_blocks=torch.zeros(1, 2, 10, dtype=torch.int32), **common)


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the CPU cases ran in this process")
def test_cpu_cases_in_a_fresh_process() -> None:
    run_in_fresh_process(__file__)
