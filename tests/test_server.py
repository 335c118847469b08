"""`sparsedecode serve` on smollm2-135m (CPU): live servers on 127.0.0.1 driven by the official openai client.

Each server runs in a thread of this process on the same `LLM` whose `generate` gives the reference texts
(computed before the server starts: the engine is driven by one thread at a time)."""
from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import httpx2
import openai
import pytest
import torch
import uvicorn
from click.testing import CliRunner

from sparsedecode import LLM
from sparsedecode.bench.serve import free_port, wait_healthy
from sparsedecode.cli import offload_option
from sparsedecode.server.app import build_app
from sparsedecode.server.cli import serve_command
from sparsedecode.server.responses import TextDeltas

pytestmark = pytest.mark.slow  # real model weights

MODEL = "smollm2-135m"
MAX_CONTEXT = 512  # the CPU decode attention reads max_context tokens a row: keep it small
API_KEY = "test-key"
QUESTIONS = [
    "Name three colours.", "What is the capital of France?", "Write a haiku about caches.", "Count to five.",
    "What is 2 + 2?", "Say hello in Spanish.", "Describe the sea in one sentence.", "Name a fruit.",
]
NEW_TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """A small model decodes fastest on one thread; several spin against each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def live_server(llm: LLM, names: list[str], api_key: str | None = None) -> Iterator[str]:
    """uvicorn in a thread on a free port; stopped (engine loop included) on exit, failure or not."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(llm, names, api_key), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 60, thread.is_alive)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def references(llm: LLM, questions: list[str] = QUESTIONS) -> list[str]:
    """Greedy texts of the chat-templated questions, one `generate` call each."""
    return [llm.generate([llm.apply_chat_template(q)], max_new_tokens=NEW_TOKENS, temperature=0)[0].text
            for q in questions]


@contextmanager
def method_server(method: str, **options) -> Iterator[tuple[str, list[str]]]:
    """(URL, reference texts) of a server of `method`, under the model's name and "alias"."""
    llm = LLM(MODEL, method=method, device="cpu", max_num_seqs=8, max_context=MAX_CONTEXT, **options)
    expected = references(llm)
    with live_server(llm, [MODEL, "alias"], API_KEY) as url:
        yield url, expected


@pytest.fixture(scope="module")
def dense() -> Iterator[tuple[str, list[str]]]:
    with method_server("dense") as served:
        yield served


@pytest.fixture(scope="module")
def lychee() -> Iterator[tuple[str, list[str]]]:
    with method_server("lychee", roles="all") as served:  # every head a retrieval head: exact
        yield served


@pytest.fixture(scope="module")
def dense_url(dense) -> str:
    return dense[0]


def client(url: str, api_key: str = API_KEY, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, **kwargs)


def metrics(url: str) -> dict[str, float]:
    """The unlabelled view of /metrics: metric name -> value (summed over label sets)."""
    values: dict[str, float] = {}
    for name, value in re.findall(r"^sparsedecode:(\w+)\{[^}]*\} (\S+)$", httpx2.get(f"{url}/metrics").text, re.M):
        values[name] = values.get(name, 0.0) + float(value)
    return values


@pytest.mark.parametrize("method", ["dense", "lychee"])
def test_concurrent_chat_matches_generate(method: str, request: pytest.FixtureRequest) -> None:
    url, expected = request.getfixturevalue(method)

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as c:
            replies = await asyncio.gather(*(c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=NEW_TOKENS, temperature=0)
                for q in QUESTIONS))
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(ask_all()) == expected
    assert any(expected) and len(set(expected)) > 1


def test_stream_pieces_join_to_the_text(dense_url) -> None:
    c = client(dense_url)
    messages = [{"role": "user", "content": "Write a short story about a cat."}]
    for stop in (None, [" the", "."]):  # with stop strings: held-back text must never leak into the stream
        whole = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stop=stop)
        chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                stop=stop, stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
        assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert all(ch.usage is None for ch in chunks[:-1])
    assert whole.choices[0].finish_reason == "stop"

    text = c.completions.create(model="alias", prompt="The capital of France is", max_tokens=10, temperature=0)
    pieces = list(c.completions.create(model="alias", prompt="The capital of France is", max_tokens=10,
                                       temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text
    assert text.model == "alias" and text.usage.completion_tokens == 10 and text.usage.kv_fraction_read == 1.0


def test_token_id_prompts_and_continuous_usage(dense_url) -> None:
    c = client(dense_url)
    ids = [504, 3575, 282, 4649, 314]
    out = c.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 6
    chunks = list(c.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "stream_options": {
                                           "include_usage": True, "continuous_usage_stats": True}}))
    assert [ch.usage.completion_tokens for ch in chunks] == [1, 2, 3, 4, 5, 6, 6]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == out.choices[0].text


BAD_REQUESTS = [  # (what, endpoint, body, status, param, words of the message)
    ("prompt plus max_tokens over the context", "completions",
     {"model": MODEL, "prompt": "Hello", "max_tokens": MAX_CONTEXT}, 400, None, "max"),
    ("unknown model", "chat/completions",
     {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "gpt-9"),
    ("negative max_tokens", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens",
     "greater than or equal to 1"),
    ("n of 0", "completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("too many choices", "completions", {"model": MODEL, "prompt": ["hi"] * 20, "n": 13}, 400, "n",
     "more than 256 choices"),
    ("an empty prompt in a batch", "completions", {"model": MODEL, "prompt": ["hi", ""]}, 400, "prompt",
     "empty prompt"),
    ("a batch prompt over the context", "completions",
     {"model": MODEL, "prompt": ["Hello", "Hi"], "max_tokens": MAX_CONTEXT}, 400, None, "max"),
    ("no messages", "chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "at least 1"),
    ("prompt of the wrong type", "completions", {"model": MODEL, "prompt": 5}, 400, "prompt", "token ids"),
    ("token id beyond the vocabulary", "completions", {"model": MODEL, "prompt": [10**9]}, 400, None,
     "token ids must be integers in [0, 49152)"),
    ("temperature out of range", "completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400,
     "temperature", "greater than or equal to 0"),
    ("method option not allowed per request", "completions",
     {"model": MODEL, "prompt": "hi", "sparsedecode": {"budget": 64}}, 400, None, "['budget'] are not supported"),
    ("echo", "completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo", "echo=true is not supported"),
    ("too many logprobs", "completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs",
     "less than or equal to 20"),
    ("a seed beyond 64 bits", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, 400, "seed", "less than or equal"),
    ("a top_k beyond 64 bits", "completions", {"model": MODEL, "prompt": "hi", "top_k": 2**64}, 400, "top_k",
     "less than or equal"),
    ("a penalty out of range", "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                    "frequency_penalty": 2.5}, 400, "frequency_penalty",
     "less than or equal to 2"),
    ("a logit bias for a token beyond the vocabulary", "completions",
     {"model": MODEL, "prompt": "hi", "logit_bias": {"49152": 5}}, 400, None,
     "logit_bias token ids must be integers in [0, 49152)"),
    ("a logit bias over 100", "completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, 400, None,
     "logit_bias must map token ids"),
    ("min_tokens over max_tokens", "completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 5},
     400, None, "min_tokens must be an integer from 0 to max_tokens (4)"),
    ("best_of", "completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of",
     "best_of=3 is not supported by this server; leave it out or send 1"),
    ("tools", "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                   "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "tools=[{"),
    ("structured output", "completions", {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_object"}},
     400, "response_format", "leave it out or send {'type': 'text'}"),
    ("vLLM's guided decoding", "completions", {"model": MODEL, "prompt": "hi", "guided_choice": ["a", "b"]}, 400,
     "guided_choice", "leave it out"),
    ("top_logprobs without logprobs", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, None,
     "top_logprobs needs logprobs=true"),
]


@pytest.mark.parametrize("what,endpoint,body,status,param,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(dense_url, what, endpoint, body, status, param,
                                                          words) -> None:
    response = httpx2.post(f"{dense_url}/v1/{endpoint}", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"], error["message"]
    assert client(dense_url).completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_tokenize_and_detokenize(dense_url) -> None:
    """vLLM's /tokenize (a prompt, or messages through the chat template: the prompt a chat request is charged for)
    and /detokenize (back to the text); their bad input is a 400 naming the field."""
    def post(path, body):
        return httpx2.post(f"{dense_url}{path}", json={"model": MODEL, **body},
                           headers={"Authorization": f"Bearer {API_KEY}"})

    text = "The quick brown fox jumps over the lazy dog."
    tokens = post("/tokenize", {"prompt": text}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 5 and tokens["max_model_len"] == MAX_CONTEXT
    assert post("/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": text}
    assert post("/detokenize", {"tokens": []}).json() == {"prompt": ""}
    messages = [{"role": "user", "content": text}]
    chat = post("/tokenize", {"messages": messages}).json()
    charged = client(dense_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert chat["count"] == charged.usage.prompt_tokens > tokens["count"]
    without_turn = post("/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert without_turn["count"] < chat["count"] and chat["tokens"][:without_turn["count"]] == without_turn["tokens"]
    for path, body, param, words in [("/tokenize", {"prompt": ""}, "prompt", "empty prompt"),
                                     ("/tokenize", {}, None, "give either a prompt or messages"),
                                     ("/tokenize", {"prompt": "hi", "messages": messages}, None, "either"),
                                     ("/detokenize", {"tokens": [10**9]}, "tokens", "tokens must be integers in [0, "),
                                     ("/detokenize", {"tokens": "abc"}, "tokens", "valid list")]:
        response = post(path, body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (body, response.text)
        assert words in response.json()["error"]["message"], response.text


def test_default_values_change_nothing_and_penalties_and_bias_apply(dense_url) -> None:
    """What clients send by default (zero penalties, an empty logit bias, text output) is served as without it;
    a logit bias of 20 makes its token every token, streamed or not, and a repetition penalty on top of it
    turns the tokens away from it once it has been output."""
    c = client(dense_url)
    messages = [{"role": "user", "content": "Count to five."}]
    plain = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    same = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, presence_penalty=0,
                                     frequency_penalty=0.0, logit_bias={}, response_format={"type": "text"},
                                     extra_body={"repetition_penalty": 1.0, "min_tokens": 0, "min_p": None})
    assert same.choices[0].message.content == plain.choices[0].message.content
    assert same.usage.completion_tokens == 4
    token = httpx2.post(f"{dense_url}/tokenize", json={"model": MODEL, "prompt": " banana"},
                        headers={"Authorization": f"Bearer {API_KEY}"}).json()["tokens"][-1]
    biased = dict(model=MODEL, prompt="Count to five.", max_tokens=5, temperature=0, logit_bias={str(token): 20})
    whole = c.completions.create(**biased)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**biased, stream=True) if ch.choices)
    assert whole.choices[0].text == streamed == " banana" * 5
    penalized = c.completions.create(**biased, extra_body={"repetition_penalty": 2.0}).choices[0].text
    assert penalized.startswith(" banana") and " banana" not in penalized[len(" banana"):]


def test_logprobs_of_chat_and_text_completions_whole_and_streamed(dense_url) -> None:
    """Greedy: each token is its step's most likely one; the tokens' texts make the content; the streamed
    chunks carry the same log-probabilities as the whole response."""
    c = client(dense_url)
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
                                      logprobs=True, top_logprobs=3)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens == NEW_TOKENS
    assert "".join(e.token for e in entries) == whole.choices[0].message.content
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert e.top_logprobs[0].token == e.token and e.logprob == tops[0] and e.bytes == list(e.token.encode())
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    plain = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW_TOKENS, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content

    text = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                logprobs=2)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text and len(lp.token_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(top) == 2 and max(top.values()) == p for top, p in zip(lp.top_logprobs, lp.token_logprobs))
    pieces = list(c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                       logprobs=2, stream=True))
    assert [t for p in pieces for t in p.choices[0].logprobs.tokens] == lp.tokens
    assert [o for p in pieces for o in p.choices[0].logprobs.text_offset] == lp.text_offset


def test_several_choices_and_batched_prompts_are_the_single_requests(dense_url) -> None:
    """n choices of a seeded request are the requests with seeds seed, seed + 1, ...; a batch of prompts gives
    each prompt's own completion, in order; streamed, the choices' pieces join to the same texts."""
    c = client(dense_url)
    messages = [{"role": "user", "content": "Write a word."}]
    sampled = dict(model=MODEL, messages=messages, max_tokens=NEW_TOKENS, temperature=1.0)
    many = c.chat.completions.create(**sampled, n=3, seed=11)
    singles = [c.chat.completions.create(**sampled, seed=11 + i).choices[0].message.content for i in range(3)]
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert [ch.message.content for ch in many.choices] == singles and len(set(singles)) > 1
    one = c.chat.completions.create(**sampled, seed=11)
    assert many.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert many.usage.completion_tokens == sum(
        c.chat.completions.create(**sampled, seed=11 + i).usage.completion_tokens for i in range(3))
    chunks = list(c.chat.completions.create(**sampled, n=3, seed=11, stream=True,
                                            stream_options={"include_usage": True}))
    joined = ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
              for i in range(3)]
    assert joined == singles and chunks[-1].usage.completion_tokens == many.usage.completion_tokens

    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time"]
    batch = c.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    alone = [c.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text for p in prompts]
    assert [ch.text for ch in batch.choices] == [t for t in alone for _ in range(2)]
    assert batch.usage.completion_tokens == 36


def test_malformed_json_and_wrong_api_key(dense_url) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx2.post(f"{dense_url}/v1/completions", content=b'{"model": "x", "prompt": ', headers=headers)
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]

    with pytest.raises(openai.AuthenticationError) as caught:
        client(dense_url, api_key="wrong").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    assert httpx2.get(f"{dense_url}/v1/models").status_code == 401  # no key at all
    assert client(dense_url).completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text


def test_models_health_and_metrics(dense_url) -> None:
    models = client(dense_url).models.list().data
    assert [m.id for m in models] == [MODEL, "alias"]
    assert models[0].max_model_len == MAX_CONTEXT and models[0].method == "dense"
    assert httpx2.get(f"{dense_url}/health").status_code == 200  # no key needed, as for /metrics
    before = metrics(dense_url)
    client(dense_url).completions.create(model=MODEL, prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    after = metrics(dense_url)
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 3
    assert after["time_to_first_token_seconds_count"] - before["time_to_first_token_seconds_count"] == 1
    assert after["time_per_output_token_seconds_count"] - before["time_per_output_token_seconds_count"] == 2
    assert after["request_kv_fraction_read_sum"] - before["request_kv_fraction_read_sum"] == pytest.approx(1.0)
    assert after["kv_blocks_free"] > 0 and after["kv_blocks_used"] == 0 and after["num_requests_running"] == 0


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_cache_counters(caching: bool, dense_url) -> None:
    """A prompt sent twice: with prefix caching its second prefill reuses the two full blocks of 64 tokens
    (the counters say so); without it nothing is found."""
    prompt = [(17 * i) % 4000 + 10 for i in range(150)]
    llm = None
    if not caching:
        llm = LLM(MODEL, device="cpu", max_num_seqs=2, max_context=MAX_CONTEXT, enable_prefix_caching=False)
    with (live_server(llm, [MODEL]) if llm else nullcontext(dense_url)) as url:
        before = metrics(url)
        for _ in range(2):
            client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={"ignore_eos": True})
        after = metrics(url)
    assert after["prefix_cache_queries_total"] - before.get("prefix_cache_queries_total", 0) == 2 * len(prompt)
    assert after["prefix_cache_hits_total"] - before.get("prefix_cache_hits_total", 0) == (128 if caching else 0)


def wait_idle(url: str, seconds: float) -> dict[str, float]:
    deadline = time.monotonic() + seconds
    while True:
        values = metrics(url)
        if values["num_requests_running"] + values["num_requests_waiting"] == 0 or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def test_disconnect_aborts_at_once(dense_url) -> None:
    c = client(dense_url)
    free = metrics(dense_url)["kv_blocks_free"]
    long_run = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "extra_body": {"ignore_eos": True}}
    stream = c.completions.create(stream=True, **long_run)
    next(iter(stream))
    assert metrics(dense_url)["num_requests_running"] == 1
    stream.close()
    # 400 steps would take far longer than this: the request was aborted, not finished
    values = wait_idle(dense_url, 3)
    assert values["num_requests_running"] == 0 and values["kv_blocks_free"] == free

    with pytest.raises(openai.APITimeoutError):
        client(dense_url, timeout=1.0).completions.create(**long_run)
    values = wait_idle(dense_url, 3)
    assert values["num_requests_running"] == 0 and values["kv_blocks_free"] == free

    # several choices: a client gone aborts every one of them, streamed or not
    stream = c.completions.create(stream=True, n=3, **long_run)
    next(iter(stream))
    deadline = time.monotonic() + 5  # the gauges are read between engine steps
    while (values := metrics(dense_url))["num_requests_running"] + values["num_requests_waiting"] < 3:
        assert time.monotonic() < deadline, values
        time.sleep(0.05)
    stream.close()
    values = wait_idle(dense_url, 3)
    assert values["num_requests_running"] == 0 and values["kv_blocks_free"] == free
    with pytest.raises(openai.APITimeoutError):
        client(dense_url, timeout=1.0).completions.create(n=3, **long_run)
    values = wait_idle(dense_url, 3)
    assert values["num_requests_running"] == 0 and values["kv_blocks_free"] == free


def test_pool_all_free_after_many_requests_with_disconnects(dense_url) -> None:
    rng = random.Random(0)
    words = "the cache block token model decode sparse head layer budget attention query key value".split()
    # prompts of 1 to ~200 tokens, mostly short: on a CPU the prefill of long ones dominates the time
    lengths = [rng.randint(100, 180) if i % 10 == 0 else rng.randint(1, 24) for i in range(200)]
    jobs = [(" ".join(rng.choices(words, k=n)), rng.randint(1, 8), rng.random()) for n in lengths]
    total = metrics(dense_url)["kv_blocks_free"]

    async def one(c: openai.AsyncOpenAI, gate: asyncio.Semaphore, prompt: str, max_tokens: int, kind: float) -> str:
        async with gate:
            if kind < 0.4:
                reply = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens)
                return reply.choices[0].finish_reason
            gone = kind < 0.7  # a client gone mid-stream, from a request that would run much longer
            stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens + 60 * gone,
                                                stream=True, extra_body={"ignore_eos": gone})
            events = stream.__aiter__()  # held, to be closed here rather than finalised later by the collector
            async for _ in events:
                if gone:
                    break  # leave the iteration before closing: closing inside it warns of a running generator
            if gone:
                await events.aclose()
                await stream.close()
                return "disconnected"
            return "streamed"

    async def run() -> list[str]:
        gate = asyncio.Semaphore(12)
        async with openai.AsyncOpenAI(base_url=f"{dense_url}/v1", api_key=API_KEY, max_retries=0) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, gate, *job) for job in jobs)), 600)

    outcomes = asyncio.run(run())
    assert {"disconnected", "streamed", "length"} <= set(outcomes)
    values = wait_idle(dense_url, 10)
    assert values["num_requests_running"] == values["num_requests_waiting"] == values["kv_blocks_used"] == 0
    assert values["kv_blocks_free"] == total


def test_tensor_parallel_size_that_does_not_divide_the_kv_heads_is_refused() -> None:
    result = CliRunner().invoke(serve_command, ["--model", MODEL, "--tensor-parallel-size", "2"])
    assert result.exit_code == 2 and "num_kv_heads=3" in result.output and "sizes that work: 1, 3" in result.output


def test_a_model_split_over_two_processes_serves_concurrent_requests() -> None:
    """A server over a tensor-parallel engine (qwen2.5-coder-0.5b, 2 KV heads: rank 0 here and one spawned
    gloo worker): concurrent chat requests give the split engine's own greedy texts."""
    llm = LLM("qwen2.5-coder-0.5b", device="cpu", max_num_seqs=4, max_context=MAX_CONTEXT, tensor_parallel_size=2)
    try:
        expected = references(llm, QUESTIONS[:4])
        with live_server(llm, ["qwen"]) as url:
            async def run() -> list[str]:
                c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
                outs = await asyncio.gather(*(c.chat.completions.create(
                    model="qwen", messages=[{"role": "user", "content": q}], max_tokens=NEW_TOKENS, temperature=0)
                    for q in QUESTIONS[:4]))
                return [o.choices[0].message.content for o in outs]

            assert asyncio.run(run()) == expected
    finally:
        llm.close()


def test_several_decode_steps_per_engine_step_serve_the_same_texts(dense) -> None:
    """`serve --num-scheduler-steps 4`: each engine step decodes 4 tokens per request; concurrent streams
    still give the greedy texts, and their pieces join to them."""
    url, expected = dense
    llm = LLM(MODEL, device="cpu", max_num_seqs=8, max_context=MAX_CONTEXT)
    llm.engine.decode_steps = 4
    with live_server(llm, [MODEL]) as url:
        async def run() -> list[str]:
            c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

            async def streamed(q: str) -> str:
                stream = await c.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=NEW_TOKENS, temperature=0,
                    stream=True)
                return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

            return await asyncio.gather(*(streamed(q) for q in QUESTIONS))

        assert asyncio.run(run()) == expected


def test_an_offloaded_kv_cache_serves_concurrent_requests() -> None:
    """`serve --kv-offload`: the engine's pool in host memory (whole prefills, staged blocks) behind the server;
    concurrent chats give the offloaded engine's own greedy texts."""
    llm = LLM(MODEL, method="lychee+lfps", budget=64, device="cpu", max_num_seqs=4, max_context=MAX_CONTEXT,
              kv_offload=offload_option("gpu-index", None))
    expected = references(llm, QUESTIONS[:4])
    with live_server(llm, [MODEL]) as url:
        async def run() -> list[str]:
            c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            outs = await asyncio.gather(*(c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=NEW_TOKENS, temperature=0)
                for q in QUESTIONS[:4]))
            return [o.choices[0].message.content for o in outs]

        assert asyncio.run(run()) == expected


@pytest.mark.parametrize("args,words", [
    (["--offload-threads", "2"], "needs --kv-offload cpu-index"),
    (["--kv-offload", "gpu-index", "--method", "dense"], "cannot decode from an offloaded KV cache"),
])
def test_offload_flags_are_checked(args, words) -> None:
    result = CliRunner().invoke(serve_command, ["--model", MODEL, "--device", "cpu", *args])
    assert result.exit_code == 2 and words in result.output


def test_text_deltas_hold_back_half_characters() -> None:
    deltas = TextDeltas()
    assert deltas.next("caf", False) == "caf"
    assert deltas.next("caf\ufffd", False) == ""  # the first byte of "é" alone: wait for the next token
    assert deltas.next("café au", False) == "é au"
    assert deltas.next("café au \ufffd", True) == " \ufffd"  # finished: everything, as the whole text has it


def test_serve_captures_every_bucket_before_listening_unless_eager(monkeypatch) -> None:
    """The server compiles and captures its decode steps before uvicorn starts; `--enforce-eager` turns CUDA
    graphs off instead."""
    import uvicorn

    import sparsedecode
    from sparsedecode.server import app as app_module

    events = []

    class FakeEngine:
        decode_steps = 1

        def capture_decode_steps(self):
            events.append("capture")
            return [(1, 2.0), (2, 1.5)]

    class FakeLLM:
        def __init__(self, model, **kwargs):
            events.append(("llm", kwargs["cuda_graphs"]))
            self.engine = FakeEngine()

    monkeypatch.setattr(sparsedecode, "LLM", FakeLLM)
    monkeypatch.setattr(app_module, "build_app", lambda llm, names, key: "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: events.append("listen"))
    result = CliRunner().invoke(serve_command, ["--model", MODEL])
    assert result.exit_code == 0, result.output
    assert events == [("llm", True), "capture", "listen"]
    assert "decode steps captured for batch sizes 1, 2 in 3.5 s" in result.output
    events.clear()
    assert CliRunner().invoke(serve_command, ["--model", MODEL, "--enforce-eager"]).exit_code == 0
    assert events == [("llm", False), "capture", "listen"]  # capturing nothing: the engine has no graphs
