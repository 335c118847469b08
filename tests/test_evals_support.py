"""Shared by the eval tests: the real SmolLM2 tokenizer, a fake LLM and tiny QA files (no tests here)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from sparsedecode.models.registry import resolve_model


@lru_cache(maxsize=1)
def smollm2_tokenizer() -> Any:
    """The tokenizer inside the smollm2-135m GGUF (loaded once per test session: it takes seconds)."""
    gguf = resolve_model("smollm2-135m")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@dataclass
class FakeGeneration:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill_seconds: float = 0.01
    decode_tokens_per_s: float = 100.0
    kv_bytes_per_token: float = 1.0
    kv_fraction_read: float = 1.0


@dataclass
class FakeEngine:
    """`LLMEngine.check_fits` over a pool of `pool_tokens` tokens."""
    pool_tokens: int = 10**9

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.pool_tokens:
            raise ValueError(f"prompt plus max_tokens needs {prompt_tokens + max_tokens} tokens but the pool holds "
                             f"{self.pool_tokens}")


@dataclass
class FakeLLM:
    """Has `LLM`'s interface: the dense method answers with the references it was told, any other method
    answers wrongly."""
    tokenizer: Any = field(default_factory=smollm2_tokenizer)
    answers: dict[str, list[str]] = field(default_factory=dict)  # prompt -> references
    method: str = "dense"
    switches: list[tuple[str, dict]] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    constructed_with: dict[str, Any] = field(default_factory=dict)
    fail_after: int | None = None  # generate calls that succeed before one raises (a run that dies)
    config: Any = None  # the model's ModelConfig, where a test needs the head roles a method resolves to
    engine: FakeEngine = field(default_factory=FakeEngine)

    def use_method(self, name: str, **options: Any) -> None:
        self.method = name
        self.switches.append((name, options))

    def generate(self, prompts: list[str], max_new_tokens: int | list[int], temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None) -> list[FakeGeneration]:
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
        assert temperature == 0.0 and len(limits) == len(prompts) and min(limits) > 0
        if self.fail_after is not None and len(self.batches) == self.fail_after:
            raise RuntimeError("the device went away")
        self.batches.append(len(prompts))
        texts = [" ".join(self.answers.get(p, [])) if self.method == "dense" else "no idea" for p in prompts]
        return [FakeGeneration(text, [1] * max(len(text.split()), 1), len(self.tokenizer(p)["input_ids"]),
                               kv_fraction_read=1.0 if self.method == "dense" else 0.25)
                for text, p in zip(texts, prompts)]


def fake_llm_class(created: list[FakeLLM], pool_tokens: int = 10**9) -> type:
    """An `LLM` constructor stand-in for the CLI, recording each instance in `created`."""

    def construct(model: str, method: str = "dense", device: Any = None, dtype: Any = None,
                  max_context: int | None = None, **options: Any) -> FakeLLM:
        llm = FakeLLM(method=method, constructed_with={"model": model, "max_context": max_context, **options},
                      engine=FakeEngine(pool_tokens))
        created.append(llm)
        return llm

    return construct  # type: ignore[return-value]


TOPICS = ("river", "castle", "violin", "glacier", "harbor", "orchard", "comet", "lantern", "canyon", "meadow")


def write_squad(path: Path, articles: int = 10, paragraphs: int = 6) -> Path:
    """A SQuAD v2-shaped file: every paragraph holds a unique code word that answers its question."""
    data = []
    for a in range(articles):
        topic = TOPICS[a % len(TOPICS)]
        paras = []
        for p in range(paragraphs):
            code = f"code{a:02d}{p:02d}x"
            context = (f"The {topic} of region {a}-{p} is famous. Its keeper wrote the word {code} on the gate. "
                       f"Visitors come every summer to see the {topic}.")
            paras.append({"context": context, "qas": [
                {"question": f"What word is on the gate of the {topic} of region {a}-{p}?", "is_impossible": False,
                 "answers": [{"text": code, "answer_start": context.index(code)}, {"text": code}]},
                {"question": "What is the keeper's name?", "is_impossible": True, "answers": []},
            ]})
        data.append({"title": topic, "paragraphs": paras})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


def write_hotpotqa(path: Path, questions: int = 30) -> Path:
    """A HotpotQA-shaped file: two supporting paragraphs per question; the answer is in the second."""
    data = []
    for q in range(questions):
        first = [f"Town {q} lies on the {TOPICS[q % len(TOPICS)]}. ", "It has one bridge."]
        second = [f"The bridge of town {q} was built by architect Name{q:03d}z. ", "It is old."]
        data.append({"_id": str(q), "question": f"Who built the bridge of the town {q}?", "answer": f"Name{q:03d}z",
                     "context": [[f"Town {q}", first], [f"Bridge {q}", second]]})
    path.write_text(json.dumps(data))
    return path
