"""A request as the engine tracks it: its tokens, sampling parameters, state, block table and output."""
from __future__ import annotations

import enum
import time

from .output_text import OutputText
from .sampling import TokenLogprob
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (its KV freed, to be recomputed)
    RUNNING = "running"  # holds blocks and a decode slot; prefilling or decoding
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                 stop_ids: set[int], output_text: OutputText) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.output_text = output_text  # their text, grown as they come
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None  # per output token
        self.params = params
        self.seed = seed  # the sampling noise's key: the params' seed, or one the engine drew
        self.stop_ids = stop_ids
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the pool
        self.num_cached_tokens = 0  # of those, found in the prefix cache when last admitted
        self.num_hashed_blocks = 0  # leading blocks registered in the prefix cache
        self.slot: int | None = None  # decode slot while running
        self.steps_since_reset = 0  # decode steps since the slot was reset (the method's per-sequence clock)
        self.finish_reason: str | None = None
        self.kv_rows = 0.0  # K/V token rows its decode steps read (the method's count)
        self.dense_rows = 0.0  # what dense attention would have read
        self.arrival_time = time.perf_counter()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def prefill_target(self) -> int:
        """Tokens whose K/V the prefill computes: all of the prompt, or after a preemption every token but the
        last sampled one (the next decode step's input)."""
        return self.num_tokens - 1 if self.output_token_ids else self.num_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.prefill_target

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def kv_fraction_read(self) -> float:
        return self.kv_rows / self.dense_rows if self.dense_rows else 0.0
