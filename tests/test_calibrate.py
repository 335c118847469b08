import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from sparsedecode.core.selection import BlockSelector
from sparsedecode.models.loader import load_model
from sparsedecode.roles.calibrate import calibrate
from sparsedecode.roles.cli import calibrate_command
from sparsedecode.roles.head_roles import HeadRoles
from sparsedecode.roles.passes import answer_hidden_states, new_cache, prefill_context
from sparsedecode.roles.passkey import NUM_PASSKEYS, PasskeyPrompts


class CharTokenizer:
    """One token per character, ids inside tiny-llama's vocabulary of 512; no chat template."""

    chat_template = None
    bos_token = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[min(ord(ch), 511) for ch in text])

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)  # the random weights, whatever ran before in this process
    loaded = load_model("random:tiny-llama", "cpu", torch.float32)
    return dataclasses.replace(loaded, tokenizer=CharTokenizer())


@pytest.fixture
def haystack(tmp_path):
    path = tmp_path / "haystack.txt"
    path.write_text("A fox ran over the hill. The dog slept! Was it late? " * 50)
    return path


def tiny_run(tiny, haystack, tmp_path, **options):
    settings = {"target_retrieval": 2, "steps": 4, "min_length": 600, "max_length": 800, "lr": 0.05, "seed": 3,
                "haystack": haystack, "checkpoint": tmp_path / "ckpt.pt", "checkpoint_every": 2, "progress": False}
    return calibrate(tiny, **{**settings, **options})


def test_prompts_hide_the_keys_at_sentence_ends_and_are_seeded(tiny, haystack):
    text = haystack.read_text()
    a = PasskeyPrompts(tiny.tokenizer, text, 600, 800, seed=1).sample()
    b = PasskeyPrompts(tiny.tokenizer, text, 600, 800, seed=1).sample()
    assert torch.equal(a.prompt, b.prompt) and torch.equal(a.answer, b.answer)
    assert 600 <= a.prompt.shape[0] <= 800
    decode = tiny.tokenizer.decode
    keys = decode(a.answer.tolist()).split(", ")
    assert len(keys) == NUM_PASSKEYS
    for j, ((start, end), key) in enumerate(zip(a.needle_spans, keys)):
        assert decode(a.prompt[start:end].tolist()) == f" The passkey number {j + 1} is {key}."
        assert decode(a.prompt[start - 1 : start].tolist()) in ".!?"
    assert [decode(a.answer[s:e].tolist()).strip(", ") for s, e in a.key_spans] == keys


def test_answer_pass_matches_prefill_and_student_interpolates(tiny):
    model, config = tiny.model, tiny.config
    ids = torch.randint(0, config.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    context, answer = ids[:260], ids[260:]
    cache = new_cache(tiny, 400)
    prefill_context(model, cache, context)
    with torch.no_grad():
        teacher = answer_hidden_states(model, cache, 260, answer)
        selector = BlockSelector("ratio", 0.3, 16)
        dense_gates = torch.ones(config.num_layers, config.num_kv_heads)
        dense_student = answer_hidden_states(model, cache, 260, answer, dense_gates, selector)
        assert torch.allclose(dense_student, teacher, atol=1e-5)
        mixed = torch.rand(config.num_layers, config.num_kv_heads, generator=torch.Generator().manual_seed(1))
        full_budget = BlockSelector("ratio", 1.0, 16)
        assert torch.allclose(answer_hidden_states(model, cache, 260, answer, mixed, full_budget), teacher, atol=1e-5)
        assert not torch.allclose(answer_hidden_states(model, cache, 260, answer, mixed, selector), teacher, atol=1e-3)
    whole = new_cache(tiny, 400)
    assert torch.allclose(prefill_context(model, whole, ids), teacher[-1], atol=1e-5)


def test_resume_reproduces_an_uninterrupted_run(tiny, haystack, tmp_path):
    straight = tiny_run(tiny, haystack, tmp_path / "a")
    expected = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)

    class Stop(Exception):
        pass

    def stop_after_three(record):
        if record["step"] == 3:
            raise Stop

    log = tmp_path / "b" / "steps.jsonl"
    log.parent.mkdir()
    with pytest.raises(Stop):
        tiny_run(tiny, haystack, tmp_path / "b", log=log, on_step=stop_after_three)
    resumed = tiny_run(tiny, haystack, tmp_path / "b", log=log, resume=True)
    state = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    for name, value in expected["gates"].items():
        assert torch.equal(state["gates"][name], value)
    assert state["constraint"] == expected["constraint"]
    assert torch.equal(resumed.retrieval, straight.retrieval)
    assert resumed.source["gate_mean"] == straight.source["gate_mean"]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]  # step 3 of the interrupted run is not kept twice
    def timeless(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert timeless(lines) == timeless(expected["history"])
    assert set(lines[0]) == {"step", "loss", "distill", "density", "lambda", "lr", "tokens", "seconds"}


@pytest.mark.parametrize("gate", ["hardconcrete", "continuous", "attention-mass"])
def test_baselines_give_the_same_number_of_units(tiny, haystack, tmp_path, gate):
    roles = tiny_run(tiny, haystack, tmp_path, gate=gate, steps=2)
    assert roles.num_retrieval == 2 + tiny.config.num_kv_heads and roles.retrieval[0].all()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"target_retrieval": 7}, "out of range"),  # 4 layers x 2 KV heads: 6 units outside layer 0
        ({"target_retrieval": None, "density": 0.9}, "out of range"),
        ({"target_retrieval": None}, "exactly one"),
        ({"density": 0.1}, "exactly one"),
        ({"min_length": 100}, "too short"),
        ({"max_length": 5000}, "exceeds the model's context"),
        ({"gate": "kuma"}, "unknown gate"),
    ],
)
def test_bad_settings_are_refused(tiny, haystack, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        tiny_run(tiny, haystack, tmp_path, **options)


def test_missing_inputs_are_refused(tiny, haystack, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tiny_run(tiny, tmp_path / "no-such-text", tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        tiny_run(tiny, haystack, tmp_path, resume=True)
    tiny_run(tiny, haystack, tmp_path, steps=2)
    with pytest.raises(ValueError, match="settings differ"):
        tiny_run(tiny, haystack, tmp_path, steps=2, lr=0.5, resume=True)
    result = CliRunner().invoke(calibrate_command, ["--model", "smollm2-135m", "--target-retrieval", "9",
                                                    "--haystack", str(tmp_path / "missing"), "--out", "x.json"])
    assert result.exit_code == 2 and "does not exist" in result.output
    for option, value, says in [("--seed", str(2**64), "--seed"), ("--lr", "-1", "--lr")]:
        result = CliRunner().invoke(calibrate_command, ["--model", "smollm2-135m", "--target-retrieval", "9",
                                                        "--out", str(tmp_path / "r.json"), option, value])
        assert result.exit_code == 2 and says in result.output and "not in the range" in result.output, result.output
        assert not (tmp_path / "r.json").exists()


@pytest.mark.slow  # 30 steps on real weights
def test_short_smollm_calibration_lowers_the_loss_and_meets_the_density(tmp_path):
    out, log = tmp_path / "roles.json", tmp_path / "steps.jsonl"
    result = CliRunner().invoke(calibrate_command, [
        "--model", "smollm2-135m", "--target-retrieval", "9", "--steps", "30", "--min-length", "280",
        "--max-length", "450", "--lr", "0.05", "--log", str(log), "--device", "cpu", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    roles = HeadRoles.load(out)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 30
    first, last = (sum(r["distill"] for r in part) / 10 for part in (records[:10], records[-10:]))
    assert last < first
    assert abs(roles.source["final_density"] - 9 / 90) < 0.05
    assert roles.num_retrieval == 9 + 3 and roles.source["gate"] == "hardkuma"


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_every_registry_model_ships_learned_roles_at_their_target_density(name):
    from sparsedecode.models.registry import MODELS
    from sparsedecode.roles.head_roles import SHIPPED_DIR

    roles = HeadRoles.load(SHIPPED_DIR / f"{name}.json")
    assert roles.source["model"] == MODELS[name].name and roles.source["gate"] == "hardkuma"
    assert bool(roles.retrieval[0].all())
    learned = roles.num_retrieval - roles.retrieval.shape[1]
    assert learned == roles.source["target_retrieval"]
    assert learned / roles.retrieval.numel() == pytest.approx(roles.source["target_density"])
    assert 0.05 <= roles.source["target_density"] <= 0.25
