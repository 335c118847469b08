"""The OpenAI response bodies of chat and text completions, whole and as server-sent-event chunks."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine import RequestOutput, TokenLogprob



def usage(outs: list[RequestOutput], n: int = 1) -> dict[str, Any]:
    """OpenAI's usage of a request's choices so far (`n` per prompt, in prompt order: each prompt counted once),
    plus the fraction of the KV cache their decode steps read (1.0 for dense attention), weighted by tokens."""
    prompt = sum(len(out.prompt_token_ids) for out in outs[::n])
    completion = sum(len(out.token_ids) for out in outs)
    read = sum(out.kv_fraction_read * len(out.token_ids) for out in outs) / completion if completion else 0.0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "kv_fraction_read": read}


@dataclass
class Completion:
    """One request's response in the shape of its endpoint: chat (`chat=True`) or text completion."""

    model: str
    chat: bool
    token_text: Callable[[int], str] = str  # a token id's text, for log-probabilities
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    text_offsets: dict[int, int] = field(default_factory=dict)  # text completions: choice -> its text's length

    def logprobs(self, tokens: list[TokenLogprob] | None, index: int = 0) -> dict[str, Any] | None:
        """OpenAI's `logprobs` of choice `index` for these tokens: chat's `content` list, or the text
        completion's tokens, token_logprobs, top_logprobs and text_offset (continuing the choice's last call)."""
        if tokens is None:
            return None
        if self.chat:
            return {"content": [{**self._token(t.token_id, t.logprob),
                                 "top_logprobs": [self._token(i, lp) for i, lp in t.top]} for t in tokens]}
        texts = [self.token_text(t.token_id) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.text_offsets.get(index, 0))
            self.text_offsets[index] = offsets[-1] + len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{self.token_text(i): lp for i, lp in t.top} for t in tokens],
                "text_offset": offsets}

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, outs: list[RequestOutput], n: int = 1) -> dict[str, Any]:
        """The response of finished choices `outs` (`n` per prompt, in order)."""
        choices = []
        for index, out in enumerate(outs):
            content = {"message": {"role": "assistant", "content": out.text}} if self.chat else {"text": out.text}
            choices.append({"index": index, **content, "logprobs": self.logprobs(out.logprobs, index),
                            "finish_reason": out.finish_reason})
        return {**self._envelope("chat.completion" if self.chat else "text_completion", choices),
                "usage": usage(outs, n)}

    def chunk(self, index: int, piece: str, first: bool, finish_reason: str | None, usage: dict[str, Any] | None,
              with_usage: bool, logprobs: list[TokenLogprob] | None = None) -> str:
        """One event of choice `index`: the text `piece` (and the log-probabilities of the tokens new since the
        choice's last event, when asked for); `usage` in it when `with_usage` (OpenAI then sends null until
        the end)."""
        if self.chat:
            content = {"delta": {"role": "assistant", "content": piece} if first else {"content": piece}}
        else:
            content = {"text": piece}
        choice = {"index": index, **content, "logprobs": self.logprobs(logprobs, index),
                  "finish_reason": finish_reason}
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        return event({**body, "usage": usage} if with_usage else body)

    def usage_chunk(self, outs: list[RequestOutput], n: int = 1) -> str:
        """`stream_options.include_usage`: the last event, no choices, the usage of the whole request."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return event({**self._envelope(obj, []), "usage": usage(outs, n)})


def event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


DONE = event("[DONE]")


class TextDeltas:
    """The new, final part of a request's text at each step. The engine's text already holds back what a
    stop string could still cut; this also holds back a trailing U+FFFD (half of a multi-byte character,
    completed by the next token), so the pieces joined are the final text."""

    def __init__(self) -> None:
        self.sent = 0

    def next(self, text: str, finished: bool) -> str:
        end = len(text)
        while not finished and end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        piece, self.sent = text[self.sent:end], max(self.sent, end)
        return piece
