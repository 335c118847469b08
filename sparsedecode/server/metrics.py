"""The server's Prometheus metrics, named as vLLM names its own (`vllm:` becomes `sparsedecode:`), so
dashboards built for vLLM need only the prefix changed. Each server has its own registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "sparsedecode:"
# vLLM's buckets: TTFT spans a short prompt (ms) to a long prefill queue (s); a decode step is ms to s
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
FRACTION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class ServerMetrics:
    """Updated by the engine thread (prometheus_client is thread-safe), read by `/metrics`."""

    def __init__(self, model_name: str, method: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "method": method}
        names = list(labels)

        def make(kind, name: str, doc: str, extra: tuple[str, ...] = (), **kw):
            return kind(PREFIX + name, doc, [*names, *extra], registry=self.registry, **kw)

        def gauge(name: str, doc: str) -> Gauge:
            return make(Gauge, name, doc).labels(**labels)

        self.running = gauge("num_requests_running", "Requests decoding in the engine's batch.")
        self.waiting = gauge("num_requests_waiting", "Requests queued for a batch slot or KV blocks.")
        self.blocks_used = gauge("kv_blocks_used", "KV-cache blocks held by requests.")
        self.blocks_free = gauge("kv_blocks_free", "KV-cache blocks free.")
        self.cache_usage = gauge("kv_cache_usage_perc", "Fraction of the KV-cache blocks in use (0 to 1).")
        self.prompt_tokens = make(Counter, "prompt_tokens", "Prompt tokens of finished requests.").labels(**labels)
        self.prefix_queries = make(Counter, "prefix_cache_queries", "Prompt tokens of finished requests looked up "
                                   "in the prefix cache.").labels(**labels)
        self.prefix_hits = make(Counter, "prefix_cache_hits", "Prompt tokens of finished requests found in the prefix "
                                "cache (their KV blocks reused).").labels(**labels)
        self.generation_tokens = make(Counter, "generation_tokens", "Tokens generated.").labels(**labels)
        self._success = make(Counter, "request_success", "Finished requests by finish reason.", ("finished_reason",))
        self._labels = labels
        self.ttft = make(Histogram, "time_to_first_token_seconds", "Arrival to first generated token.",
                         buckets=TTFT_BUCKETS).labels(**labels)
        self.tpot = make(Histogram, "time_per_output_token_seconds", "Time between a request's generated tokens.",
                         buckets=TPOT_BUCKETS).labels(**labels)
        self.e2e = make(Histogram, "e2e_request_latency_seconds", "Arrival to the last token of finished requests.",
                        buckets=LATENCY_BUCKETS).labels(**labels)
        self.kv_fraction = make(Histogram, "request_kv_fraction_read",
                                "Per finished request: the KV-cache bytes its decode steps read over what dense "
                                "attention reads.", buckets=FRACTION_BUCKETS).labels(**labels)

    def engine_stats(self, stats: dict[str, int]) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.blocks_used.set(stats["blocks_used"])
        self.blocks_free.set(stats["blocks_free"])
        self.cache_usage.set(stats["blocks_used"] / stats["blocks_total"] if stats["blocks_total"] else 0.0)

    def tokens(self, count: int, first_after: float | None, seconds_each: float) -> None:
        """`count` new tokens of one request: the first `first_after` seconds after arrival (else None),
        the others `seconds_each` apart."""
        self.generation_tokens.inc(count)
        if first_after is not None:
            self.ttft.observe(first_after)
            count -= 1
        for _ in range(count):
            self.tpot.observe(seconds_each)

    def finished(self, reason: str, prompt_tokens: int, cached_tokens: int, seconds: float,
                 kv_fraction_read: float) -> None:
        self._success.labels(**self._labels, finished_reason=reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(cached_tokens)
        self.e2e.observe(seconds)
        self.kv_fraction.observe(kv_fraction_read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
