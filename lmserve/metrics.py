"""Prometheus metrics named as vLLM's, so a dashboard built for ``vllm serve`` works unchanged.

One ``EngineMetrics`` per server, on its own ``CollectorRegistry`` (no module-level mutable
state: two servers in one process never share a counter).

Two sources feed it:
- scheduler state (running / waiting requests, KV cache usage, prefix cache queries and
  hits, preemptions) is read from a stats callback (``AsyncLLM.get_stats``) at scrape
  time, so those values are never stale and nobody has to push them;
- per-request observations (tokens, TTFT, inter-token latency, end-to-end latency, queue
  time, finished requests by reason) are pushed through the ``observe_*`` methods.
  The server's serving layer calls them once per request (it sees every output and every
  disconnect), so the engine must not call them for the same requests.

Every metric carries the label ``model_name`` (the first served model name). The scheduler-state
series also carry ``engine`` (``"0"``, or each data-parallel replica's index, as vLLM labels them);
the per-request series are observed in the API server, for all replicas together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Buckets as vLLM's (vllm/v1/metrics/loggers.py).
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0]
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
_TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]

FINISHED_REASONS = ("stop", "length", "abort", "repetition", "error")


class _StatsCollector:
    """Turns one ``get_stats()`` call per scrape into gauges and counters."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats_fn: Callable[[], dict[str, Any]] | None = None

    def describe(self) -> list:
        return []  # collected lazily; avoids calling stats_fn at registration time

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        stats: dict[str, Any] = {}
        if self.stats_fn is not None:
            try:
                stats = self.stats_fn() or {}
            except Exception:  # noqa: BLE001 - a scrape must not fail because the engine did
                stats = {}
        engines = stats.get("engines") or [stats]  # one engine: the stats are its own
        labels = ["model_name", "engine"]

        def family(kind: type, name: str, doc: str, value: Any) -> Any:
            f = kind(name, doc, labels=labels)
            for i, s in enumerate(engines):
                f.add_metric([self.model_name, str(i)], float(value(s)))
            return f

        g, c = GaugeMetricFamily, CounterMetricFamily
        yield family(g, "vllm:num_requests_running", "Number of requests in model execution batches.",
                     lambda s: s.get("num_running", 0))
        yield family(g, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                     lambda s: s.get("num_waiting", 0) + s.get("num_pending", 0))
        yield family(g, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                     lambda s: s.get("kv_cache_usage", 0.0))
        yield family(c, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried "
                     "tokens.", lambda s: s.get("prefix_cache_queries", 0))
        yield family(c, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                     lambda s: s.get("prefix_cache_hits", 0))
        yield family(c, "vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
                     lambda s: s.get("num_preemptions", 0))


class EngineMetrics:
    """The server's Prometheus metrics. Thread-safe (prometheus_client metrics are)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=False)
        self._stats = _StatsCollector(model_name)
        self.registry.register(self._stats)
        r, ln = self.registry, ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", ln,
                                     registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         ln, registry=r)
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in "
                              "seconds.", ln, buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in "
                             "seconds.", ln, buckets=_ITL_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds", "Histogram of time per output "
                              "token in seconds.", ln, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in "
                             "seconds.", ln, buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING "
                                    "phase for request.", ln, buckets=_LATENCY_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens "
                                               "processed.", ln, buckets=_TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens", "Number of generation "
                                                   "tokens processed.", ln, buckets=_TOKEN_BUCKETS,
                                                   registry=r)
        # Create the labelled children up front so every series exists (at 0) from the first scrape.
        for m in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.tpot, self.e2e,
                  self.queue_time, self.request_prompt_tokens, self.request_generation_tokens):
            m.labels(model_name)
        for reason in FINISHED_REASONS:
            self.request_success.labels(model_name, reason)

    # ------------------------------------------------------------------ sources
    def set_stats_source(self, fn: Callable[[], dict[str, Any]] | None) -> None:
        """``fn()`` -> dict with num_running, num_waiting, kv_cache_usage (0..1),
        prefix_cache_queries, prefix_cache_hits, num_preemptions (cumulative); called per scrape.
        With data parallelism its ``engines`` entry lists one such dict per replica: one series each."""
        self._stats.stats_fn = fn

    # ------------------------------------------------------------------ observations
    def observe_prompt_tokens(self, n: int) -> None:
        if n > 0:
            self.prompt_tokens.labels(self.model_name).inc(n)

    def observe_generation_tokens(self, n: int) -> None:
        if n > 0:
            self.generation_tokens.labels(self.model_name).inc(n)

    def observe_first_token(self, ttft_s: float) -> None:
        self.ttft.labels(self.model_name).observe(max(ttft_s, 0.0))

    def observe_inter_token(self, latency_s: float) -> None:
        self.itl.labels(self.model_name).observe(max(latency_s, 0.0))

    def observe_request_finished(self, finished_reason: str, e2e_s: float, *, prompt_tokens: int,
                                 generation_tokens: int, queue_s: float | None = None,
                                 decode_s: float | None = None) -> None:
        """One call per finished (or aborted) request; ``finished_reason`` in FINISHED_REASONS.
        Also counts its prompt and generated tokens (do not call observe_*_tokens for it too)."""
        name = self.model_name
        self.request_success.labels(name, finished_reason or "stop").inc()
        self.e2e.labels(name).observe(max(e2e_s, 0.0))
        if queue_s is not None:
            self.queue_time.labels(name).observe(max(queue_s, 0.0))
        self.observe_prompt_tokens(prompt_tokens)
        self.observe_generation_tokens(generation_tokens)
        self.request_prompt_tokens.labels(name).observe(prompt_tokens)
        self.request_generation_tokens.labels(name).observe(generation_tokens)
        if decode_s is not None and generation_tokens > 1:
            self.tpot.labels(name).observe(max(decode_s, 0.0) / (generation_tokens - 1))

    # ------------------------------------------------------------------ exposition
    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
