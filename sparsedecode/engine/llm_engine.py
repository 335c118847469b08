"""The continuous-batching engine: requests come and go at any step.

`add_request` queues a request, `step` runs one scheduler step (decode steps for the running sequences,
then prefill chunks within the token budget) and returns the requests that advanced, `abort` ends one
and frees its blocks at once. One engine serves one decode method; method options are the engine's,
not per request (they size per-slot state and select compiled graphs).
"""
from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..methods.base import DecodeMethod
from .block_manager import BlockManager
from .model_runner import DecodeRow, ModelRunner, PrefillRequest
from .output_text import OutputText
from .sampling import PenaltyRow, TokenLogprob
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .tensor_parallel import TensorParallelRunner


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    text: str  # generated so far, stop strings cut (while running, a possible stop string's start is held back)
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort" once finished
    kv_fraction_read: float  # KV rows read by its decode steps over what dense attention reads
    num_cached_tokens: int  # prompt tokens taken from the prefix cache
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids when the request asked for them


class LLMEngine:
    def __init__(self, runner: ModelRunner | TensorParallelRunner, tokenizer: Any, eos_token_ids: set[int], *,
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True, decode_steps: int = 1) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(runner.pool.num_blocks, runner.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens,
                                   whole_prefills=runner.pool.layer_major_prefill)
        self.block_manager.recompute_tokens = max(1, runner.method.prompt_queries)
        self.decode_steps = decode_steps  # decode steps per `step` (one host synchronisation each)
        self.sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()

    # -- requests -------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt: text is tokenised as given, ids are checked."""
        if not isinstance(prompt, (str, list, tuple)):
            raise ValueError(f"a prompt is text or a list of token ids, not {type(prompt).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (random weights): give the prompt as token ids")
            if not prompt:
                raise ValueError("empty prompt: give at least one token of text")
            bos = getattr(self.tokenizer, "bos_token", None)
            return self.tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos))).input_ids
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        return self.check_token_ids(prompt)

    def check_token_ids(self, ids: list[int] | tuple[int, ...], what: str = "prompt token ids") -> list[int]:
        """`ids` as a list, after checking that each is a token of the vocabulary (ValueError naming `what`)."""
        vocab = self.runner.config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} must be integers in [0, {vocab}); got {bad[:5]}")
        return list(ids)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError, naming the limit, if a request of `prompt_tokens` prompt tokens that may generate
        `max_tokens` more exceeds the context or the whole KV pool."""
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt of {prompt_tokens} tokens plus max_tokens={max_tokens} exceeds the model's context of "
                f"{self.max_model_len} tokens; shorten the prompt or lower max_tokens")
        blocks = self.block_manager.blocks_for(prompt_tokens + max_tokens)
        if blocks > self.block_manager.num_usable_blocks:
            raise ValueError(
                f"prompt plus max_tokens needs {blocks} KV blocks but the pool holds "
                f"{self.block_manager.num_usable_blocks}; give the engine more KV memory (num_blocks, "
                "gpu_memory_utilization) or shorten the request")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, method_options: dict[str, Any] | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError naming the problem for a prompt that does not
        fit, bad parameters or a duplicate id."""
        params = params or SamplingParams()
        if method_options:
            raise ValueError(
                f"per-request method options {sorted(method_options)} are not supported: one engine serves one "
                "method with one set of options; set them when starting it (LLM(..., method=..., option=value) "
                "or `sparsedecode serve --method M -o option=value`)")
        ids = self.encode(prompt)
        self.check_fits(len(ids), params.max_tokens)
        if params.logit_bias:
            self.check_token_ids(list(params.logit_bias), "logit_bias token ids")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        stop_ids = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else self.eos_token_ids)
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        seq = Sequence(request_id, ids, params, seed, stop_ids, OutputText(self.tokenizer))
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        """End a request now and free its blocks; unknown or finished ids are ignored."""
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            seq.output_text.finish(seq.output_token_ids)
            self.scheduler.finish(seq, "abort")

    def use_method(self, method: DecodeMethod) -> None:
        """Decode with `method` from the next step on. Running sequences keep their KV and restart the new
        method's per-sequence state as if their prompt had just been prefilled."""
        self.runner.use_method(method)
        self.block_manager.recompute_tokens = max(1, method.prompt_queries)
        for seq in self.scheduler.running:
            if not seq.in_prefill:
                self.runner.start_decoding(seq.slot, seq.block_table, seq.num_computed_tokens)
                seq.steps_since_reset = 0

    def capture_decode_steps(self) -> list[tuple[int, float]]:
        """Compile and capture the decode step of every batch-size bucket now, before serving, instead of
        when the first step of each bucket runs (seconds each, which would stall every running request);
        returns (bucket, seconds) per bucket, nothing without CUDA graphs. Only while no sequence decodes."""
        if self.scheduler.running:
            raise RuntimeError("capture_decode_steps needs an idle engine: call it before adding requests")
        return self.runner.capture_decode_steps()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict[str, int]:
        usable, free = self.block_manager.num_usable_blocks, self.block_manager.num_free_blocks
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "blocks_total": usable, "blocks_used": usable - free, "blocks_free": free,
                "block_size": self.block_manager.block_size, "preemptions": self.scheduler.num_preemptions}

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler step; returns the requests that produced tokens or finished in it."""
        plan = self.scheduler.schedule(self.decode_steps)
        advanced: list[Sequence] = []
        # Decode before prefill: a slot that completes its prefill now is reset after this step's decode,
        # which ran over that slot as an idle row.
        if plan.decodes:
            rows = [self._row(seq, seq.num_tokens - 1) for seq in plan.decodes]
            tokens_per_row, logprobs_per_row = self.runner.decode(rows, plan.decode_steps)
            for j, (seq, tokens) in enumerate(zip(plan.decodes, tokens_per_row)):
                logprobs = logprobs_per_row[j] if logprobs_per_row else None
                for i, token in enumerate(tokens):
                    self._append(seq, token, decoded=True, logprob=logprobs[i] if logprobs else None)
                    if seq.is_finished:
                        break
                if not seq.is_finished:
                    seq.num_computed_tokens = seq.num_tokens - 1
                    self.block_manager.cache_full_blocks(seq)
                advanced.append(seq)
        if plan.prefills:
            requests = [PrefillRequest(c.seq.all_token_ids[c.start : c.start + c.num_tokens], c.start,
                                       c.seq.block_table, c.completes and not c.seq.output_token_ids, c.seq.slot)
                        for c in plan.prefills]
            logits = self.runner.prefill(requests)
            first_tokens = []
            for chunk in plan.prefills:
                seq = chunk.seq
                seq.num_computed_tokens += chunk.num_tokens
                self.block_manager.cache_full_blocks(seq)
                if chunk.completes:
                    self.runner.start_decoding(seq.slot, seq.block_table, seq.num_computed_tokens)
                    seq.steps_since_reset = 0
                    if not seq.output_token_ids:
                        first_tokens.append(seq)
            if first_tokens:
                rows = [self._row(seq, seq.num_tokens) for seq in first_tokens]
                now = time.perf_counter()
                tokens, logprobs = self.runner.sample(logits, rows)
                for j, (seq, token) in enumerate(zip(first_tokens, tokens)):
                    seq.first_token_time = now
                    self._append(seq, token, decoded=False, logprob=logprobs[j] if logprobs else None)
                    advanced.append(seq)
        outputs = [self.output(seq) for seq in advanced]
        for seq in advanced:
            if seq.is_finished:
                self.sequences.pop(seq.request_id, None)
        return outputs

    def _row(self, seq: Sequence, position: int) -> DecodeRow:
        p = seq.params
        penalties = None
        if p.penalized:
            fresh = seq.steps_since_reset == 0  # the slot's device state is written from the history
            penalties = PenaltyRow(p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p,
                                   p.min_tokens, p.logit_bias or {}, list(seq.stop_ids) if fresh else [],
                                   seq.prompt_token_ids if fresh else None,
                                   list(seq.output_token_ids) if fresh else None)
        return DecodeRow(seq.slot, seq.output_token_ids[-1] if seq.output_token_ids else 0, position,
                         seq.steps_since_reset, seq.block_table, p.temperature, p.top_p, p.top_k, seq.seed,
                         p.logprobs, penalties)

    def _append(self, seq: Sequence, token: int, decoded: bool, logprob: TokenLogprob | None = None) -> None:
        """Add a sampled token (with its log-probabilities, when asked for) and end the sequence at a stop
        token, stop string or its limit."""
        seq.output_token_ids.append(token)
        if logprob is not None:  # the runner's, for a sequence that asked
            seq.logprobs.append(logprob)
        new_chars = seq.output_text.add(seq.output_token_ids)
        if decoded:  # the step that sampled it read the sequence's first num_tokens - 1 tokens
            method, seq_len = self.runner.method, seq.num_tokens - 1
            seq.kv_rows += method.kv_tokens_read(seq_len, seq.steps_since_reset)
            seq.dense_rows += method.dense_tokens_read(seq_len)
            seq.steps_since_reset += 1
        reason = None
        if token in seq.stop_ids:
            reason = "stop"
        elif seq.params.stop and self._stop_string_ends_in(seq.output_text.text, new_chars, seq.params.stop):
            reason = "stop"
        elif len(seq.output_token_ids) >= seq.params.max_tokens:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason)

    @staticmethod
    def _stop_string_ends_in(text: str, new_chars: int, stops: list[str]) -> bool:
        """Whether a stop string ends in the last `new_chars` characters (earlier ones were checked before)."""
        start = max(len(text) - new_chars - max(map(len, stops)) + 1, 0)
        return new_chars > 0 and any(s in text[start:] for s in stops)

    def _finish(self, seq: Sequence, reason: str) -> None:
        steps = seq.steps_since_reset
        if steps:  # reads decided on the device, priced at the mean length of the decode
            mean_len = seq.num_tokens - 1 - (steps - 1) / 2
            seq.kv_rows += self.runner.extra_kv_tokens_read(seq.slot, mean_len)
        seq.finish_time = time.perf_counter()
        seq.output_text.finish(seq.output_token_ids)
        self.scheduler.finish(seq, reason)

    # -- text -----------------------------------------------------------------------------------
    def output(self, seq: Sequence) -> RequestOutput:
        text, stops = seq.output_text.text, seq.params.stop or []
        cut = min((text.index(s) for s in stops if s in text), default=len(text))
        if not seq.is_finished and stops:
            cut = min(cut, len(text) - max(len(s) for s in stops) + 1)  # may still become a stop string
        return RequestOutput(seq.request_id, seq.prompt_token_ids, list(seq.output_token_ids), text[: max(cut, 0)],
                             seq.is_finished, seq.finish_reason, seq.kv_fraction_read, seq.num_cached_tokens,
                             None if seq.logprobs is None else list(seq.logprobs))
