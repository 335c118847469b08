"""How one request samples and when it stops."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .sampling import MAX_LOGPROBS

INT64_MAX = 2**63 - 1


@dataclass
class SamplingParams:
    """Per-request sampling and stopping, named as vLLM names them.

    Greedy when `temperature` is 0. `top_k` 0 keeps every token. Sampling with a `seed` gives the same
    tokens whatever else shares the batch; without one the engine draws a seed. `stop_token_ids` end the
    request besides the model's end-of-sequence tokens, which `ignore_eos` disables. `stop` strings are
    cut from the text. `logprobs` (0 to MAX_LOGPROBS): report each generated token's log-probability and
    that many of the most likely tokens at its step; None: none.

    Penalties and biases, as vLLM applies them to the raw logits before temperature (greedy requests too):
    `logit_bias` adds its value (-100 to 100) to its token's logit; `min_tokens` keeps the end-of-sequence and
    stop tokens out until that many tokens are out; `repetition_penalty` (> 0, 1: none) divides the positive
    logits of every token of the prompt and the output so far and multiplies the negative ones;
    `frequency_penalty` and `presence_penalty` (-2 to 2) subtract, per token of the output so far, its count
    times the first and once the second. `min_p` (0 to 1) drops, when sampling, the tokens less likely than
    `min_p` times the most likely one.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer of at least 1, not {self.max_tokens!r}")
        # The step samples from device tensors of every row's parameters: a value that does not fit them would
        # fail the whole batch's step, so it is refused here, with the request.
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, not {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], not {self.top_p!r}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= INT64_MAX:
            raise ValueError(f"top_k must be an integer from 0 (no limit) to 2**63 - 1, not {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -INT64_MAX - 1 <= self.seed <= INT64_MAX):
            raise ValueError(f"seed must be a 64-bit integer (-2**63 to 2**63 - 1) or None, not {self.seed!r}")
        if self.stop is not None and (not all(isinstance(s, str) and s for s in self.stop)):
            raise ValueError(f"stop must be a list of non-empty strings, not {self.stop!r}")
        if self.stop_token_ids is not None and not all(isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of integers, not {self.stop_token_ids!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer from 0 to {MAX_LOGPROBS} (the top tokens reported per "
                             f"token) or None, not {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number from -2 to 2, not {value!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1: none), not {self.repetition_penalty!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be a number from 0 to 1, not {self.min_p!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or \
                not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer from 0 to max_tokens ({self.max_tokens}), not "
                             f"{self.min_tokens!r}")
        if self.logit_bias is not None and (
                not isinstance(self.logit_bias, dict)
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and _is_number(b) and -100 <= b <= 100
                           for t, b in self.logit_bias.items())):
            raise ValueError("logit_bias must map token ids (integers >= 0) to numbers from -100 to 100, not "
                             f"{self.logit_bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a penalty, bias, min_p or min_tokens changes the logits (the decode step's own variant)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.min_p
                    or self.min_tokens or self.logit_bias)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
