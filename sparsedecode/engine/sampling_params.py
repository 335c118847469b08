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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
