"""The engine against transformers' own generation on real small models, and its error handling."""
from __future__ import annotations

import json

import pytest
import torch

from transformers import LogitsProcessor, LogitsProcessorList

from sparsedecode import LLM, SamplingParams
from sparsedecode.bench.e2e import hf_model_like
from sparsedecode.engine.model_runner import TOKEN_CHOICES, PrefillRequest
from sparsedecode.kernels import sparse_decode_attention_ref
from sparsedecode.models import transformer
from sparsedecode.models.config import UnsupportedModelError

pytestmark = pytest.mark.slow  # real model weights

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


@pytest.fixture(scope="module")
def smollm() -> LLM:
    return LLM("smollm2-135m", device="cpu")


def hf_greedy(llm: LLM, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' own generate (its modeling code, SDPA) over the engine's weights: the converted weights
    are transformers' own GGUF dequantisation, so this checks every layer of the engine's decoder."""
    model = hf_model_like(llm.engine.runner.model)
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_greedy_matches_transformers_generate(name: str, smollm: LLM) -> None:
    llm = smollm if name == "smollm2-135m" else LLM(name, device="cpu")
    prompts = [*PROMPTS, llm.apply_chat_template("Name three colours.")]
    token_lists = [llm.tokenizer(p).input_ids for p in prompts]
    new_tokens = 20
    # One batch of prompts of different lengths: every sequence must match its own HF generation.
    batched = llm.generate(token_lists, max_new_tokens=new_tokens, stop_token_ids=[])
    for ids, got in zip(token_lists, batched):
        expected = hf_greedy(llm, ids, new_tokens)  # HF stops at end-of-sequence; we ran on
        assert got.token_ids[: len(expected)] == expected and len(expected) >= 2
    assert len({len(t) for t in token_lists}) > 1


def test_chunked_prefill_matches_one_shot(smollm: LLM) -> None:
    ids = smollm.tokenizer(" ".join(PROMPTS * 6)).input_ids
    runner = smollm.engine.runner
    table = list(range(1, 1 + -(-len(ids) // runner.block_size)))  # free blocks: nothing else runs
    logits = []
    for chunk in (len(ids), 17):
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            out = runner.prefill([PrefillRequest(part, start, table, start + len(part) == len(ids))])
        logits.append(out)
    # float32 on CPU: chunking only changes summation order inside attention.
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_lychee_all_and_full_budget_equal_dense(smollm: LLM) -> None:
    ids = smollm.tokenizer(" ".join(PROMPTS * 8)).input_ids
    smollm.use_method("dense")
    dense = smollm.generate([ids], max_new_tokens=12, stop_token_ids=[])[0]
    for method, options in [("lychee", {"roles": "all"}), ("lychee", {"roles": "random:20", "budget": 4096})]:
        smollm.use_method(method, **options)
        assert smollm.generate([ids], max_new_tokens=12, stop_token_ids=[])[0].token_ids == dense.token_ids
    smollm.use_method("lychee", roles="random:20", budget=128)
    sparse = smollm.generate([ids], max_new_tokens=12, stop_token_ids=[])[0]
    assert 0 < sparse.kv_fraction_read < 0.75
    smollm.use_method("dense")


def test_sampling_is_seeded_and_streaming_matches(smollm: LLM) -> None:
    prompt = smollm.apply_chat_template("Tell me a story.")
    a = smollm.generate([prompt], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)[0]
    b = smollm.generate([prompt], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)[0]
    assert a.token_ids == b.token_ids
    streamed = "".join(smollm.stream(prompt, max_new_tokens=16))
    assert streamed == smollm.generate([prompt], max_new_tokens=16)[0].text


def run_requests(llm: LLM, requests: list[tuple[list[int], SamplingParams]]) -> list:
    """The engine's outputs of requests queued together (one batch), in their order."""
    engine = llm.engine
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step()})
    return [outputs[i] for i in ids]


def test_logprobs_are_the_models_log_softmax_and_leave_the_tokens_alone(smollm: LLM) -> None:
    """Sampled tokens (not always the most likely) with their log-probabilities and top 3: transformers' own
    log-softmax at each position; the same request without logprobs samples the same tokens."""
    prompt, ids = PROMPTS[2], smollm.engine.encode(PROMPTS[2])
    kwargs = dict(max_new_tokens=6, temperature=1.5, seed=3)
    got = smollm.generate([prompt, PROMPTS[0]], **kwargs, logprobs=3)[0]
    assert got.token_ids == smollm.generate([prompt], **kwargs)[0].token_ids
    model = hf_model_like(smollm.engine.runner.model)
    with torch.no_grad():
        logits = model(torch.tensor([ids + got.token_ids])).logits[0, len(ids) - 1 : -1].float()
    want = logits.log_softmax(-1)
    assert [t.token_id for t in got.logprobs] == got.token_ids
    assert any(t.token_id != t.top[0][0] for t in got.logprobs)  # sampled: the gather is tested
    for i, t in enumerate(got.logprobs):
        assert abs(t.logprob - want[i, t.token_id]) < 1e-3
        top = want[i].topk(3)
        assert [j for j, _ in t.top] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in t.top]), top.values, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="logprobs must be an integer from 0 to 20"):
        smollm.generate([prompt], logprobs=21)
    # in one batch, a request that asks and one that does not
    asked, plain = run_requests(smollm, [(ids, SamplingParams(max_tokens=4, logprobs=0)),
                                         (ids, SamplingParams(max_tokens=4))])
    assert plain.logprobs is None and plain.token_ids == asked.token_ids
    assert [t.token_id for t in asked.logprobs] == asked.token_ids
    assert all(t.top == [] and t.logprob <= 0 for t in asked.logprobs)


class OutputPenalty(LogitsProcessor):
    """vLLM's frequency and presence penalties for transformers' generate: per token of the output so far."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0)


def test_penalties_and_bias_match_transformers_generate(smollm: LLM) -> None:
    """Greedy decoding with each penalty against transformers' generate with the same logits processors: the
    repetition penalty is transformers' own, frequency and presence `OutputPenalty`, logit bias and min_tokens
    its sequence bias and minimum length. All requests in one batch with an unpenalized one, which stays as
    it is alone."""
    smollm.use_method("dense")
    model = hf_model_like(smollm.engine.runner.model)
    prompt = smollm.engine.encode("1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,")
    eos = sorted(smollm.engine.eos_token_ids)
    new = 12
    cases = [  # (ours, transformers' generate kwargs)
        (dict(repetition_penalty=1.5), dict(repetition_penalty=1.5)),
        (dict(frequency_penalty=1.5, presence_penalty=0.5),
         dict(logits_processor=LogitsProcessorList([OutputPenalty(len(prompt), 1.5, 0.5)]))),
        (dict(repetition_penalty=1.2, frequency_penalty=-0.5, presence_penalty=1.0),
         dict(repetition_penalty=1.2, logits_processor=LogitsProcessorList([OutputPenalty(len(prompt), -0.5, 1.0)]))),
        (dict(min_tokens=5, logit_bias={eos[0]: 100.0}), dict(min_new_tokens=5, sequence_bias={(eos[0],): 100.0})),
    ]
    plain = SamplingParams(max_tokens=new, ignore_eos=True)
    outputs = run_requests(smollm, [(prompt, plain)] + [(prompt, SamplingParams(max_tokens=new, **ours))
                                                         for ours, _ in cases])
    assert outputs[0].token_ids == run_requests(smollm, [(prompt, plain)])[0].token_ids
    for (ours, theirs), got in zip(cases, outputs[1:]):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=eos,
                              **theirs)[0, len(prompt):].tolist()
        assert got.token_ids == want, ours
        assert got.token_ids != outputs[0].token_ids, ours  # the penalty changed something
    assert len(outputs[-1].token_ids) == 6 and outputs[-1].finish_reason == "stop"  # 5 held back, then biased eos


def test_generate_takes_sampling_params(smollm: LLM) -> None:
    """vLLM's `generate(prompts, sampling_params=...)`: one SamplingParams per prompt (with top_k and a penalty,
    which the keywords do not give) decodes what the engine decodes for those requests, and so does `stream`;
    one SamplingParams serves every prompt; keywords beside it and a list of the wrong length are refused."""
    smollm.use_method("dense")
    prompts = [PROMPTS[0], "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"]
    params = [SamplingParams(max_tokens=8, temperature=0.9, top_k=5, seed=2),
              SamplingParams(max_tokens=12, ignore_eos=True, repetition_penalty=1.5)]
    got = smollm.generate(prompts, sampling_params=params)
    want = run_requests(smollm, [(smollm.engine.encode(p), sp) for p, sp in zip(prompts, params)])
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [len(g.token_ids) for g in got] == [8, 12]
    assert got[1].token_ids != smollm.generate(prompts[1], max_new_tokens=12, stop_token_ids=[])[0].token_ids
    assert "".join(smollm.stream(prompts[1], sampling_params=params[1])) == got[1].text
    shared = smollm.generate(prompts, sampling_params=params[1])
    assert shared[1].token_ids == got[1].token_ids and len(shared[0].token_ids) == 12
    with pytest.raises(ValueError, match="temperature, stop given beside sampling_params"):
        smollm.generate(prompts, temperature=0.5, stop=["x"], sampling_params=params)
    with pytest.raises(ValueError, match="a list of 2 .one per prompt., not 1 items"):
        smollm.generate(prompts, sampling_params=params[:1])
    with pytest.raises(ValueError, match="not dict"):
        smollm.generate(prompts, sampling_params={"temperature": 0.5})
    with pytest.raises(ValueError, match="holds dict where a SamplingParams goes"):
        smollm.generate(prompts, sampling_params=[params[0], {"temperature": 0.5}])


def test_chat_takes_conversations_as_the_openai_api_gives_them(smollm: LLM) -> None:
    """vLLM's `LLM.chat`: a conversation goes through the chat template (a system turn changes the prompt, and
    so the answer) and decodes what `generate` decodes for the templated prompt; several conversations give
    one Generation each, with generate's options; malformed messages are refused before anything runs."""
    smollm.use_method("dense")
    hello = [{"role": "user", "content": "Name three colours."}]
    system = [{"role": "system", "content": "Answer in French, in one word."}, *hello]
    assert smollm.apply_chat_template(hello) == smollm.apply_chat_template("Name three colours.")
    assert smollm.apply_chat_template(system) != smollm.apply_chat_template(hello)
    assert smollm.apply_chat_template(hello, add_generation_prompt=False) != smollm.apply_chat_template(hello)
    one = smollm.chat(hello, max_new_tokens=8)
    assert [g.token_ids for g in one] == [g.token_ids for g in smollm.generate(smollm.apply_chat_template(hello),
                                                                               max_new_tokens=8)]
    both = smollm.chat([hello, system], sampling_params=SamplingParams(max_tokens=8))
    assert len(both) == 2 and both[0].token_ids == one[0].token_ids and both[1].token_ids != one[0].token_ids
    for bad in ([], [{"content": "no role"}], ["just text"], "not a list of messages either".split()):
        with pytest.raises(ValueError, match="messages must be a non-empty list"):
            smollm.chat(bad)
    no_tokenizer = LLM("random:tiny-llama", device="cpu", block_size=16, max_context=256)
    with pytest.raises(ValueError, match="no tokenizer .random weights.: use a plain prompt"):
        no_tokenizer.chat(hello)


def test_penalties_survive_a_method_change_and_min_p_one_is_greedy(smollm: LLM) -> None:
    """A penalized sequence whose slot state is rewritten from its history mid-generation (the engine's method
    changes after 6 of its 12 tokens) gives the tokens of an uninterrupted run: at the last token the
    frequency penalty of the comma's three earlier outputs, two of them before the change, turns greedy away
    from it. min_p=1 keeps only the most likely token."""
    smollm.use_method("dense")
    prompt = smollm.engine.encode("1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,")
    params = SamplingParams(max_tokens=12, ignore_eos=True, frequency_penalty=1.2)
    whole = run_requests(smollm, [(prompt, params)])[0].token_ids
    plain = run_requests(smollm, [(prompt, SamplingParams(max_tokens=12, ignore_eos=True))])[0].token_ids
    assert whole[:-1] == plain[:-1] and whole[-1] != plain[-1]
    engine = smollm.engine
    request = engine.add_request(prompt, params)
    outputs = {}
    for _ in range(6):  # the prefill and its first token, then 5 decode steps
        outputs.update({o.request_id: o for o in engine.step()})
    assert len(outputs[request].token_ids) == 6
    smollm.use_method("dense")  # running sequences restart their slot state
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step()})
    assert outputs[request].token_ids == whole
    hot = dict(max_tokens=12, ignore_eos=True, temperature=2.0, seed=1)
    kept, free = run_requests(smollm, [(prompt, SamplingParams(**hot, min_p=1.0)), (prompt, SamplingParams(**hot))])
    assert kept.token_ids == plain and free.token_ids != plain


def test_stop_strings_and_tokens(smollm: LLM) -> None:
    out = smollm.generate(["1, 2, 3, 4, 5,"], max_new_tokens=30, stop=[" 8"])[0]
    assert out.finish_reason == "stop" and " 8" not in out.text and "7" in out.text


def test_each_prompt_stops_at_its_own_limit(smollm: LLM) -> None:
    smollm.use_method("dense")
    together = smollm.generate(PROMPTS[:2], max_new_tokens=[3, 9], stop_token_ids=[])
    alone = [smollm.generate([p], max_new_tokens=n, stop_token_ids=[])[0] for p, n in zip(PROMPTS[:2], [3, 9])]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [len(g.token_ids) for g in together] == [3, 9] and {g.finish_reason for g in together} == {"length"}
    with pytest.raises(ValueError, match="2 limits for 3 prompts"):
        smollm.generate(PROMPTS, max_new_tokens=[3, 9])
    with pytest.raises(ValueError, match="at least 1"):
        smollm.generate(PROMPTS[:2], max_new_tokens=[3, 0])


def test_bad_input_errors(smollm: LLM, tmp_path) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        smollm.generate([""], max_new_tokens=4)
    small = LLM("smollm2-135m", device="cpu", max_context=64)
    with pytest.raises(ValueError, match="exceeds max_context"):
        small.generate(["word " * 80], max_new_tokens=4)
    # a batch whose last prompt does not fit the pool is refused whole: nothing of it stays queued
    tight = LLM("random:tiny-llama", device="cpu", max_context=512, block_size=16, num_blocks=8)
    with pytest.raises(ValueError, match="KV blocks but the pool holds"):
        tight.generate([[5] * 20, [5] * 300], max_new_tokens=4)
    assert not tight.engine.has_unfinished_requests()
    assert len(tight.generate([[5] * 20], max_new_tokens=4)[0].token_ids) == 4
    with pytest.raises(FileNotFoundError):
        LLM(str(tmp_path / "missing.gguf"))
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(UnsupportedModelError, match="gpt2.*supported architectures: llama, qwen2, qwen3, mistral"):
        LLM(str(folder))
    with pytest.raises(ValueError, match="unknown method"):
        smollm.use_method("nope")
    with pytest.raises(TypeError, match="unknown option"):
        smollm.use_method("lychee", budgett=1024)
    smollm.use_method("dense")


def test_compiled_forward_matches_eager_with_one_graph_for_all_layers() -> None:
    from torch._dynamo.utils import counters

    llm = LLM("random:tiny-llama", device="cpu", block_size=16, max_context=256)
    model = llm.model
    tokens, positions = torch.tensor([3, 7]), torch.tensor([20, 33])
    keys = torch.randn(2, llm.config.num_kv_heads, 40, llm.config.head_dim, generator=torch.Generator().manual_seed(0))

    def attention(layer, q, k, v):  # one query per sequence over fixed random keys
        return sparse_decode_attention_ref(q, keys, keys, torch.tensor([21, 34]), llm.method.scale)[0]

    eager = model.forward(tokens, positions, attention)
    graphs_before = counters["stats"]["unique_graphs"]
    model.compile_decode()
    compiled = model.forward(tokens, positions, attention, fused=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    # The layers' weights are graph inputs: one graph before and one after attention, however many layers.
    assert llm.config.num_layers > 2 and counters["stats"]["unique_graphs"] - graphs_before == 2


@pytest.mark.parametrize("shape", ["tiny-llama", "llama-3.1-8b", "qwen3-8b"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_table_gathers_the_bits_rope_computes(shape: str, dtype: torch.dtype) -> None:
    from sparsedecode.models.config import model_config_from_hf
    from sparsedecode.models.shapes import random_shape_config
    from sparsedecode.models.transformer import RotaryEmbedding

    rope = RotaryEmbedding(model_config_from_hf(random_shape_config(f"random:{shape}")))
    table = rope.table(40_000, dtype)
    positions = torch.cat([torch.randint(0, 40_000, (37,), generator=torch.Generator().manual_seed(1)),
                           torch.tensor([0, 1, 39_999])])
    (cos, sin), (cos_t, sin_t) = rope(positions, dtype), rope(positions, dtype, table)
    assert table.shape == (40_000, 2, cos.shape[-1]) and cos_t.dtype == dtype
    assert torch.equal(cos_t, cos) and torch.equal(sin_t, sin)
    # one position at a time, as a batch-1 decode step asks
    assert all(torch.equal(torch.stack(rope(p[None], dtype, table)), torch.stack(rope(p[None], dtype)))
               for p in positions[:5])


def test_decode_compile_mode_reaches_torch_compile_and_bad_modes_are_refused(monkeypatch) -> None:
    llm = LLM("random:tiny-llama", device="cpu", block_size=16, max_context=256)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs["options"]) or fn)
    llm.model.compile_decode("max-autotune-no-cudagraphs")
    tuned = {**torch._inductor.list_mode_options("max-autotune-no-cudagraphs"), "triton.enable_pdl": False}
    assert tuned["max_autotune"] and calls == [tuned] * 2  # the work before and after each layer's attention
    # Inductor's kernels launch dependently where ours do (kernels.pdl: Hopper GPUs; never on the CPU)
    monkeypatch.setattr(transformer, "pdl_enabled", lambda device: True)
    llm.model.compile_decode()
    assert calls[2:] == [{"triton.enable_pdl": True}] * 2
    with pytest.raises(ValueError, match="'reduce-overhead' is not one of default, max-autotune-no-cudagraphs"):
        llm.model.compile_decode("reduce-overhead")  # Inductor's CUDA graphs inside the engine's own
    with pytest.raises(ValueError, match="compile_mode 'max-autotune' is not one of default, max-autotune-no"):
        LLM("random:tiny-llama", device="cpu", compile_mode="max-autotune")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile_mode,decode_linear", [("default", "torch"), ("max-autotune-no-cudagraphs", "torch"),
                                                         ("default", "auto"), ("default", "gemv-fused")])
def test_graph_replays_match_eager_decoding_on_gpu(compile_mode: str, decode_linear: str) -> None:
    prompts = [[(7 * i) % 300 + 1 for i in range(n)] for n in (50, 131, 260)]
    tokens, logprobs = [], []
    for fast in (False, True):
        torch.manual_seed(0)  # the same random weights in both
        llm = LLM("random:tiny-llama", device="cuda", dtype=torch.float32, block_size=16, max_context=512,
                  cuda_graphs=fast, compile_decode=fast, compile_mode=compile_mode,
                  decode_linear=decode_linear if fast else "torch")
        assert llm.decode_linear == ({"auto": "gemv"}.get(decode_linear, decode_linear) if fast else "torch")
        tokens.append([g.token_ids for g in llm.generate(prompts, max_new_tokens=12, stop_token_ids=[])])
        with_logprobs = llm.generate(prompts, max_new_tokens=12, stop_token_ids=[], logprobs=2)
        assert [g.token_ids for g in with_logprobs] == tokens[-1]  # the logprob step variant samples the same
        logprobs.append(torch.tensor([[[t.logprob, *(v for _, v in t.top)] for t in g.logprobs]
                                      for g in with_logprobs]))
        assert bool(llm.engine.runner.graphs) == fast
        penalized = [SamplingParams(max_tokens=12, ignore_eos=True, frequency_penalty=1.0, repetition_penalty=1.3,
                                    logit_bias={5: 2.0}, min_tokens=3, temperature=t, min_p=0.1, seed=3)
                     for t in (0.0, 0.8, 0.0)]
        tokens[-1].append([o.token_ids for o in run_requests(llm, list(zip(prompts, penalized)))])
        assert any(key[3] for key in llm.engine.runner.graphs) == fast  # the penalized step variant replayed
    assert tokens[0] == tokens[1]
    torch.testing.assert_close(logprobs[1], logprobs[0], atol=1e-3, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs Hopper or later")
@pytest.mark.parametrize("method", ["dense", "lychee+lfps"])
def test_dependent_launches_give_the_same_bits_on_gpu(method: str, monkeypatch) -> None:
    """Dependent launches (kernels.pdl, ours and Inductor's): every kernel starts while the one before it
    drains; the tokens and their log-probabilities stay those of plain launches (SPARSEDECODE_PDL=0), through
    the captured steps."""
    prompts = [[(7 * i) % 300 + 1 for i in range(n)] for n in (50, 131, 260)]
    options = dict(budget=64, roles="random:4") if method != "dense" else {}
    runs = []
    for pdl in ("0", "1"):
        monkeypatch.setenv("SPARSEDECODE_PDL", pdl)
        torch.manual_seed(0)  # the same random weights in both
        llm = LLM("random:tiny-llama", method=method, device="cuda", dtype=torch.float32, block_size=16,
                  max_context=512, **options)
        out = llm.generate(prompts, max_new_tokens=24, stop_token_ids=[], logprobs=2)
        assert llm.engine.runner.graphs
        runs.append(([g.token_ids for g in out], [[[t.logprob, *(v for _, v in t.top)] for t in g.logprobs]
                                                  for g in out]))
    assert runs[0] == runs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_buckets_serve_every_later_step_on_gpu() -> None:
    prompts = [[(5 * i) % 300 + 1 for i in range(n)] for n in (40, 90, 150)]
    tokens = []
    for capture in (False, True):
        torch.manual_seed(0)
        llm = LLM("random:tiny-llama", device="cuda", dtype=torch.float32, block_size=16, max_context=512,
                  max_num_seqs=6)
        runner = llm.engine.runner
        if capture:
            captured = llm.engine.capture_decode_steps()
            assert [b for b, _ in captured] == [1, 2, 4, 6] and all(s > 0 for _, s in captured)
            graphs = dict(runner.graphs)
            assert set(graphs) == {(b, choice, False, False) for b in (1, 2, 4, 6) for choice in TOKEN_CHOICES}
        tokens.append([g.token_ids for g in llm.generate(prompts, max_new_tokens=10, stop_token_ids=[])])
        if capture:  # no step compiled or captured anything new
            assert runner.graphs == graphs
    assert tokens[0] == tokens[1]


def test_capture_decode_steps_refuses_a_busy_engine_and_is_empty_without_graphs() -> None:
    llm = LLM("random:tiny-llama", device="cpu", block_size=16, max_context=256)
    assert llm.engine.capture_decode_steps() == []  # CPU: no CUDA graphs
    llm.engine.add_request([1, 2, 3])
    llm.engine.step()
    with pytest.raises(RuntimeError, match="needs an idle engine"):
        llm.engine.capture_decode_steps()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts the CUDA copies of a step")
def test_compiled_decode_step_copies_nothing_per_layer_on_gpu() -> None:
    """Compiled, a projection added to the residual stream and returned would become addmm, which copies the
    residual into its output first: two device-to-device copies a layer. The decode step makes fewer copies
    than the model has layers (the step's own bookkeeping)."""
    from torch.profiler import ProfilerActivity, profile

    llm = LLM("random:tiny-llama", device="cuda", block_size=16, max_context=512, cuda_graphs=False)
    llm.generate([[1, 2, 3, 4, 5]], max_new_tokens=3)  # compiles
    engine = llm.engine
    rid = engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=4, ignore_eos=True))
    while not engine.sequences[rid].output_token_ids:
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()  # a decode step
        torch.cuda.synchronize()
    copies = sum(e.device_type == torch.autograd.DeviceType.CUDA and e.name.startswith("Memcpy DtoD")
                 for e in prof.events())
    assert copies < llm.config.num_layers
