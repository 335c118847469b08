"""The OpenAI API's request bodies and errors, with vLLM's extensions (`top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos`, `stop_token_ids`, `stream_options.continuous_usage_stats`) and ours (`sparsedecode`:
per-request method options).

Unknown fields are ignored, as OpenAI and vLLM do, so that clients sending newer fields keep working; the known
fields that would change the output but are not implemented (`NOT_IMPLEMENTED`: tools, structured output, beam
search, ...) are refused unless they hold the value that changes nothing.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..engine import SamplingParams
from ..engine.sampling_params import INT64_MAX
from ..engine.sampling import MAX_LOGPROBS

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) for /v1/completions; chat runs to the context's end
MAX_CHOICES = 256  # prompts x n of one request at most: each choice is an engine request


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


#: Fields of OpenAI's and vLLM's APIs that would change the output and that this server does not implement, with
#: the values that change nothing (what clients send by default). Any other value is refused, not ignored.
NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "best_of": (1,), "use_beam_search": (False,), "tools": ([],),
    "tool_choice": ("none", "auto"), "response_format": ({"type": "text"},), "guided_json": (),
    "guided_regex": (), "guided_choice": (), "guided_grammar": (), "prompt_logprobs": (), "suffix": ("",),
    "skip_special_tokens": (True,),
}


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with the usage of the whole request
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the first served model name
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)  # 0 or -1: no top-k filter (vLLM takes -1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices per prompt; with a seed, choice i samples with seed + i
    seed: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX - MAX_CHOICES)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False  # run to max_tokens whatever the model says (benchmarks)
    # None (sent by some clients): the value that changes nothing
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)  # vLLM's: 1 is none
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # vLLM's
    min_tokens: int | None = Field(None, ge=0)  # vLLM's
    logit_bias: dict[int, float] | None = None  # token id (a string in JSON) -> bias from -100 to 100
    stream: bool = False
    stream_options: StreamOptions | None = None
    sparsedecode: dict[str, Any] | None = None  # per-request decode-method options, checked by the engine

    @model_validator(mode="before")
    @classmethod
    def _refuse_not_implemented(cls, body: Any) -> Any:
        """A field of `NOT_IMPLEMENTED` with a value that would change the output is a 400 naming it (an
        APIError passes through pydantic, so the error's `param` is the field)."""
        for name, harmless in NOT_IMPLEMENTED.items():
            value = body.get(name) if isinstance(body, dict) else None
            if value is not None and not any(value == h for h in harmless):
                keep = f" or send {harmless[0]!r}" if harmless else ""
                raise APIError(400, f"{name}={value!r} is not supported by this server; leave it out{keep}",
                               param=name)
        return body

    def requested_logprobs(self) -> int | None:
        """How many top log-probabilities per token the request asks for (0: only the tokens'), None: none."""
        return None

    def sampling_params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        """The engine's parameters of choice `choice` of a prompt; `max_tokens` is this request's limit after the
        endpoint's default."""
        return SamplingParams(
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=None if self.seed is None else self.seed + choice,
            max_tokens=max_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=self.requested_logprobs(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=self.min_p or 0.0,
            min_tokens=self.min_tokens or 0,
            logit_bias=self.logit_bias,
        )

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(GenerationRequest):
    prompt: list[str | list[int]]  # one or more prompts (a single one is given as text or token ids)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top tokens per generated token
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo=true is not supported: the response holds the completion only (the prompt's "
                             "own log-probabilities are not computed)")
        return echo

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, prompt: Any) -> Any:
        """Text, token ids, or a batch of either (a list of texts or of token-id lists): always a list here."""
        batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
        for one in batch:
            ids = isinstance(one, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                for t in one)
            if not (isinstance(one, str) or ids):
                raise ValueError("give the prompt as text, as a list of token ids (integers >= 0), or as a list "
                                 "of either")
            if not one:
                raise ValueError("empty prompt")
        return batch


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: handed to the chat template

    role: str
    content: str | list[TextPart] | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates take it: content as one string."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {**self.model_dump(exclude_none=True), "content": content or ""}


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer OpenAI name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: the token ids of a prompt, or of chat messages through the chat template, as the
    engine would see them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True  # with messages: end with the assistant's turn opening, as chat does

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either a prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's `/detokenize`: the text of token ids."""

    model: str | None = None
    tokens: list[int]
