"""Sparse decoding inside transformers (`sparsedecode.hf`), on real weights (smollm2-135m loaded by
transformers from the registry's GGUF; qwen2.5-coder-0.5b as transformers' model over the engine's weights): under settings that read every cached token, every method generates the tokens of
plain `model.generate` (SDPA) for a left-padded batch; under sparse budgets every method decodes the
tokens the engine decodes, reads a fraction of the KV cache, and does not depend on the pool growing;
the model is unchanged after the block; unsupported settings raise."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from sparsedecode import LLM
from sparsedecode.bench.e2e import hf_model_like
from sparsedecode.hf import SparseCache, UnsupportedSettingError, sparse_decoding
from sparsedecode.hf import cache as hf_cache
from sparsedecode.methods import METHODS
from sparsedecode.models.config import UnsupportedModelError
from sparsedecode.models.loader import load_model
from sparsedecode.models.registry import resolve_model
from sparsedecode.roles.head_roles import HeadRoles, shipped_roles_path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
LONG_PROMPT = " ".join(PROMPTS * 8)  # about 250 tokens: many blocks of 16
NEW_TOKENS = 10
MAX_CONTEXT = 512

pytestmark = pytest.mark.slow  # real model weights (transformers dequantises each GGUF)


def covering(name: str) -> dict:
    """Options under which the method reads every cached token."""
    options = {"budget": MAX_CONTEXT} if "budget" in METHODS[name].defaults else {}
    return {**options, "roles": "all"} if "roles" in METHODS[name].defaults else options


#: options under which a method's per-sequence step clock decides something within a short generation
STEP_CLOCKS = {"lychee": {"dense_every": 4}, "lfps": {"refresh_every": 4}, "lychee+lfps": {"refresh_every": 4}}


def sparse(name: str) -> dict:
    """A budget reading a fraction of LONG_PROMPT (blocks of 16 tokens where the method has blocks)."""
    return {"budget": 64, **({"block_size": 16} if "block_size" in METHODS[name].defaults else {})}


class Model:
    """A registry model with a left-padding tokenizer, as transformers' own model class: loaded by
    transformers from its GGUF (`gguf_file=`), or with `engine_weights` built over the engine's converted
    weights (`hf_model_like`: the same values without transformers' slow dequantisation)."""

    def __init__(self, name: str, engine_weights: bool = False) -> None:
        if engine_weights:
            loaded = load_model(name, torch.device("cpu"), torch.float32)
            self.model, self.tokenizer = hf_model_like(loaded.model), loaded.tokenizer
            self.tokenizer.padding_side = "left"
        else:
            path = resolve_model(name)
            self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, padding_side="left")
        self.batch = self.inputs(PROMPTS)
        self.plain = self.generate(self.batch)

    def inputs(self, prompts: list[str]) -> dict:
        return dict(self.tokenizer(prompts, return_tensors="pt", padding=True))

    def generate(self, inputs: dict, **kwargs) -> torch.Tensor:
        return self.model.generate(**inputs, **{"max_new_tokens": NEW_TOKENS, "do_sample": False, **kwargs})


@pytest.fixture(scope="module")
def smollm() -> Model:
    return Model("smollm2-135m")


@pytest.fixture(scope="module")
def engine() -> LLM:
    return LLM("smollm2-135m", device="cpu", block_size=16, max_context=MAX_CONTEXT)


@pytest.fixture(scope="module")
def qwen() -> Model:
    return Model("qwen2.5-coder-0.5b", engine_weights=True)


def test_the_batch_is_left_padded(smollm: Model) -> None:
    mask = smollm.batch["attention_mask"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_covering_settings_generate_as_plain_transformers(name: str, smollm: Model) -> None:
    with sparse_decoding(smollm.model, name, max_context=MAX_CONTEXT, **covering(name)) as sd:
        out = smollm.generate(smollm.batch)
    assert torch.equal(out, smollm.plain)
    assert sd.stats().decode_steps == out.shape[1] - smollm.batch["input_ids"].shape[1] - 1  # 1st token: prefill's


@pytest.mark.parametrize("name", sorted(METHODS))
def test_covering_settings_generate_as_plain_transformers_on_qwen(name: str, qwen: Model) -> None:
    with sparse_decoding(qwen.model, name, max_context=MAX_CONTEXT, **covering(name)):
        assert torch.equal(qwen.generate(qwen.batch), qwen.plain)


def test_shipped_learned_roles_are_found_and_a_covering_budget_generates_as_plain(smollm: Model) -> None:
    with sparse_decoding(smollm.model, "lychee", max_context=MAX_CONTEXT, budget=MAX_CONTEXT) as sd:
        out = smollm.generate(smollm.batch)
    shipped = HeadRoles.load(shipped_roles_path(sd.config))
    assert torch.equal(sd.method.roles.retrieval, shipped.retrieval) and not shipped.retrieval.all()
    assert torch.equal(out, smollm.plain)


def test_sampling_draws_as_plain_transformers(smollm: Model) -> None:
    def draw() -> torch.Tensor:
        torch.manual_seed(0)
        return smollm.generate(smollm.batch, do_sample=True, top_k=50, temperature=0.9)

    plain = draw()
    with sparse_decoding(smollm.model, "lychee", max_context=MAX_CONTEXT, roles="all"):
        assert torch.equal(draw(), plain)


@pytest.mark.parametrize("name", sorted(n for n in METHODS if "budget" in METHODS[n].defaults))
def test_a_sparse_budget_reads_a_fraction(name: str, smollm: Model) -> None:
    inputs = smollm.inputs([LONG_PROMPT, PROMPTS[0]])
    with sparse_decoding(smollm.model, name, max_context=MAX_CONTEXT, **sparse(name)) as sd:
        out = smollm.generate(inputs)
    stats = sd.stats()
    assert stats.decode_steps == out.shape[1] - inputs["input_ids"].shape[1] - 1 > 0
    assert 0 < stats.sequence_kv_fraction_read[0] < 1  # the long prompt
    assert 0 < sd.kv_fraction_read < 1


@pytest.mark.parametrize("name", sorted(n for n in METHODS if "budget" in METHODS[n].defaults))
def test_a_sparse_budget_decodes_as_the_engine(name: str, smollm: Model, engine: LLM) -> None:
    """The method's own implementation on the same weights: each row of a left-padded batch decodes the
    tokens the engine decodes for its prompt alone (up to transformers' end-of-sequence)."""
    options = {**sparse(name), **STEP_CLOCKS.get(name, {})}
    inputs = smollm.inputs([LONG_PROMPT, PROMPTS[2]])
    with sparse_decoding(smollm.model, name, max_context=MAX_CONTEXT, **options):
        out = smollm.generate(inputs, max_new_tokens=16)
    engine.use_method(name, **options)
    stops = smollm.model.generation_config.eos_token_id
    stops = {stops} if isinstance(stops, int) else set(stops)
    for row, mask in zip(out, inputs["attention_mask"]):
        prompt, new = row[: mask.shape[0]][mask.bool()].tolist(), row[mask.shape[0]:].tolist()
        expected = new[: next((i + 1 for i, t in enumerate(new) if t in stops), len(new))]
        got = engine.generate([prompt], max_new_tokens=16, stop_token_ids=[])[0].token_ids
        assert got[: len(expected)] == expected and len(expected) >= 4


@pytest.mark.parametrize("name", ["quest", "lfps"])  # state per pool block; state carried across steps
def test_growing_the_pool_changes_nothing(name: str, smollm: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = smollm.inputs([LONG_PROMPT, PROMPTS[0]])
    runs = []
    for spare in (hf_cache.SPARE_TOKENS, 0):  # 0: no free block after the prompts, growths as rows open blocks
        monkeypatch.setattr(hf_cache, "SPARE_TOKENS", spare)
        with sparse_decoding(smollm.model, name, max_context=MAX_CONTEXT, **sparse(name)) as sd:
            runs.append((smollm.generate(inputs, max_new_tokens=24), sd.stats(), sd.cache.pool.num_blocks))
    (tokens, stats, blocks), (grown_tokens, grown_stats, grown_blocks) = runs
    prompt_blocks = 1 + sum(-(-n // sd.block_size) for n in inputs["attention_mask"].sum(1).tolist())
    assert prompt_blocks < grown_blocks < blocks
    assert torch.equal(grown_tokens, tokens) and grown_stats == stats


def test_after_the_block_the_model_is_as_before(smollm: Model) -> None:
    before = smollm.model.config._attn_implementation
    with sparse_decoding(smollm.model, "lychee", max_context=MAX_CONTEXT, **sparse("lychee")) as sd:
        inside = smollm.model.generate(**smollm.batch, max_new_tokens=3, return_dict_in_generate=True)
    assert smollm.model.config._attn_implementation == before == "sdpa"
    assert torch.equal(smollm.generate(smollm.batch), smollm.plain)
    assert isinstance(inside.cache, SparseCache) and inside.cache is sd.cache
    with pytest.raises(RuntimeError, match="has exited"):
        smollm.model(**smollm.inputs(["x"] * 3), cache=inside.cache)


def test_every_generate_call_gets_a_cache_of_its_own_batch(smollm: Model) -> None:
    with sparse_decoding(smollm.model, "lychee", max_context=MAX_CONTEXT, roles="all") as sd:
        alone = smollm.generate(smollm.inputs(PROMPTS[:1]))
        first = sd.cache
        assert torch.equal(smollm.generate(smollm.batch), smollm.plain)
    assert sd.cache is not first and alone.shape[0] == 1


@pytest.mark.parametrize("setting, error, match", [
    ({"num_beams": 2}, UnsupportedSettingError, "num_beams"),
    ({"use_cache": False}, UnsupportedSettingError, "use_cache"),
    ({"cache": DynamicCache()}, UnsupportedSettingError, "past_key_values"),
    ({"cache_implementation": "static"}, UnsupportedSettingError, "cache_implementation"),
    ({"prefill_chunk_size": 4}, UnsupportedSettingError, "prefill_chunk_size"),
    ({"prompt_lookup_num_tokens": 3}, ValueError, "Assisted decoding"),  # transformers': our cache cannot crop
])
def test_unsupported_generate_settings_raise(setting: dict, error: type, match: str, smollm: Model) -> None:
    inputs = smollm.inputs([PROMPTS[0] * 2])
    with sparse_decoding(smollm.model, "lychee", max_context=MAX_CONTEXT), pytest.raises(error, match=match):
        smollm.model.generate(**inputs, max_new_tokens=3, **setting)


def test_an_assistant_model_raises(smollm: Model) -> None:
    c = smollm.model.config
    assistant = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with sparse_decoding(smollm.model, "lychee", max_context=MAX_CONTEXT), pytest.raises(ValueError, match="Assisted"):
        smollm.model.generate(**smollm.inputs(PROMPTS[:1]), max_new_tokens=3, assistant_model=assistant)


def test_unsupported_inputs_and_models_raise(smollm: Model) -> None:
    right_padded = dict(smollm.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right"))
    with sparse_decoding(smollm.model, "lychee", max_context=MAX_CONTEXT):
        with pytest.raises(UnsupportedSettingError, match="left padding"):
            smollm.model.generate(**right_padded, max_new_tokens=2)
        with pytest.raises(RuntimeError, match="already inside"), sparse_decoding(smollm.model, "lychee"):
            pass
    longest = int(smollm.batch["attention_mask"].sum(1).max())
    for max_context, new_tokens, match in ((longest - 1, 1, "prompt of"), (longest + 2, 6, "grows past")):
        with sparse_decoding(smollm.model, "lychee", max_context=max_context), pytest.raises(ValueError, match=match):
            smollm.generate(smollm.batch, max_new_tokens=new_tokens, eos_token_id=None)
    with pytest.raises(TypeError, match="unknown option"):
        sparse_decoding(smollm.model, "quest", roles="all")
    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, sliding_window=16))
    with pytest.raises(UnsupportedModelError, match="sliding"):
        sparse_decoding(sliding, "lychee")
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    tiny.lm_head.to("meta")  # offloaded, as accelerate leaves a layer it keeps elsewhere
    with pytest.raises(UnsupportedSettingError, match="several devices"), sparse_decoding(tiny, "dense"):
        pass
    assert smollm.model.config._attn_implementation == "sdpa"
