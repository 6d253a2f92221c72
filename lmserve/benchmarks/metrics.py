"""Per-request records and the aggregate figures of `lmserve bench serve`, with vLLM's definitions (TTFT, TPOT, ITL, E2EL) and its result block."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_METRIC_HEADERS = {  # attribute -> (name, section header), in print order
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
    "client_queue_time": ("Client Queue Time", "Client-side Queueing"),
    "e2el_including_client_queue": ("E2EL incl. Client Queue", "Queue-inclusive End-to-end Latency"),
}



# ----------------------------------------------------------------------------- data
@dataclass
class SampleRequest:
    """One benchmark request: a text prompt or a token-id prompt of ``prompt_len`` tokens."""

    prompt: str | list[int]
    prompt_len: int
    expected_output_len: int
    request_id: str = ""


@dataclass
class RequestOutput:
    """What the client measured for one request (times in seconds, ``time.perf_counter`` based)."""

    success: bool = False
    error: str = ""
    generated_text: str = ""
    prompt_len: int = 0
    output_tokens: int = 0  # usage.completion_tokens; 0 when the server sent no usage
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2EL
    start_time: float = 0.0
    client_queue_time: float = 0.0  # time spent waiting for --max-concurrency


@dataclass
class BenchmarkMetrics:
    """Aggregates over successful requests; ``*_ms`` values are milliseconds and
    ``percentiles_*`` are ``[(percentile, value_ms), ...]``."""

    completed: int
    failed: int
    total_input: int
    total_output: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    stats_ms: dict[str, dict[str, Any]]  # metric -> {"mean", "median", "std", "percentiles"}


# ----------------------------------------------------------------------------- metrics
def _stats_ms(values: list[float], percentiles: list[float]) -> dict[str, Any]:
    """Mean/median/std/percentiles in ms; an empty list reads as 0 (vLLM's ``values or 0``)."""
    v = values or [0.0]
    return {"mean": float(np.mean(v)) * 1000, "median": float(np.median(v)) * 1000,
            "std": float(np.std(v)) * 1000,
            "percentiles": [(p, float(np.percentile(v, p)) * 1000) for p in percentiles]}


def _peaks(outputs: list[RequestOutput]) -> tuple[float, int]:
    """(max output tokens in any one-second bucket, peak number of requests in flight); one token
    per chunk at ``start + ttft + cumsum(itl)``, requests as half-open ``[start, start+latency)``."""
    if not outputs:
        return 0.0, 0
    t0 = min(o.start_time for o in outputs)
    t1 = max(o.start_time + o.latency for o in outputs)
    buckets = np.zeros(int(np.ceil(t1 - t0)) + 1)
    events: list[tuple[float, int]] = []
    for o in outputs:
        t = o.start_time + o.ttft
        for token_time in [t, *(t + x for x in np.cumsum(o.itl))]:
            b = int(token_time - t0)
            if 0 <= b < len(buckets):
                buckets[b] += 1
        events += [(o.start_time, 1), (o.start_time + o.latency, -1)]
    current = peak = 0
    for _, delta in sorted(events):  # a departure sorts before an arrival at the same time
        current += delta
        peak = max(peak, current)
    return float(buckets.max()), peak


def count_output_tokens(output: RequestOutput, tokenizer: Any = None) -> int:
    """Usage count, else the tokenizer's count of the text, else the number of chunks."""
    if output.output_tokens:
        return output.output_tokens
    if tokenizer is not None:
        return len(tokenizer(output.generated_text, add_special_tokens=False).input_ids)
    return 1 + len(output.itl)


def calculate_metrics(outputs: list[RequestOutput], duration_s: float, percentiles: list[float],
                      tokenizer: Any = None) -> tuple[BenchmarkMetrics, list[int]]:
    """vLLM's ``calculate_metrics``; returns the metrics and each request's output length (0 if failed)."""
    ok = [o for o in outputs if o.success]
    output_lens = [count_output_tokens(o, tokenizer) if o.success else 0 for o in outputs]
    ok_lens = [n for o, n in zip(outputs, output_lens) if o.success]
    tpots = [(o.latency - o.ttft) / (n - 1) for o, n in zip(ok, ok_lens) if n > 1]
    series = {"ttft": [o.ttft for o in ok], "tpot": tpots, "itl": [x for o in ok for x in o.itl],
              "e2el": [o.latency for o in ok], "client_queue_time": [o.client_queue_time for o in ok],
              "e2el_including_client_queue": [o.latency + o.client_queue_time for o in ok]}
    total_input, total_output = sum(o.prompt_len for o in ok), sum(output_lens)
    peak_tps, peak_conc = _peaks(ok)
    return BenchmarkMetrics(
        completed=len(ok), failed=len(outputs) - len(ok), total_input=total_input, total_output=total_output,
        request_throughput=len(ok) / duration_s, output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        max_output_tokens_per_s=peak_tps, max_concurrent_requests=peak_conc,
        stats_ms={k: _stats_ms(v, percentiles) for k, v in series.items()}), output_lens


def format_result_block(metrics: BenchmarkMetrics, duration_s: float, max_concurrency: int | None,
                        request_rate: float, selected_metrics: list[str]) -> str:
    """The result block, line for line as ``vllm bench serve`` prints it."""
    def row(label: str, value: Any, fmt: str = "") -> str:
        return "{:<40} {:<10{}}".format(label, value, fmt)

    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
             row("Successful requests:", metrics.completed), row("Failed requests:", metrics.failed)]
    if max_concurrency is not None:
        lines.append(row("Maximum request concurrency:", max_concurrency))
    if not math.isinf(request_rate):
        lines.append(row("Request rate configured (RPS):", request_rate, ".2f"))
    lines += [row("Benchmark duration (s):", duration_s, ".2f"),
              row("Total input tokens:", metrics.total_input),
              row("Total generated tokens:", metrics.total_output),
              row("Request throughput (req/s):", metrics.request_throughput, ".2f"),
              row("Output token throughput (tok/s):", metrics.output_throughput, ".2f"),
              row("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s, ".2f"),
              row("Peak concurrent requests:", float(metrics.max_concurrent_requests), ".2f"),
              row("Total token throughput (tok/s):", metrics.total_token_throughput, ".2f")]
    for attr, (name, header) in _METRIC_HEADERS.items():
        if attr not in selected_metrics:
            continue
        s = metrics.stats_ms[attr]
        lines += ["{s:{c}^{n}}".format(s=header, n=50, c="-"),
                  row(f"Mean {name} (ms):", s["mean"], ".2f"), row(f"Median {name} (ms):", s["median"], ".2f")]
        for p, value in s["percentiles"]:
            lines.append(row(f"P{_pword(p)} {name} (ms):", value, ".2f"))
    lines.append("=" * 50)
    return "\n".join(lines)


def _pword(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def result_dict(metrics: BenchmarkMetrics, outputs: list[RequestOutput], output_lens: list[int],
                duration_s: float, selected_metrics: list[str]) -> dict[str, Any]:
    """The benchmark part of vLLM's result JSON (same keys)."""
    result: dict[str, Any] = {
        "duration": duration_s, "completed": metrics.completed, "failed": metrics.failed,
        "total_input_tokens": metrics.total_input, "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput, "request_goodput": None,
        "output_throughput": metrics.output_throughput, "total_token_throughput": metrics.total_token_throughput,
        "input_lens": [o.prompt_len for o in outputs], "output_lens": output_lens,
        "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs],
        "latencies": [o.latency for o in outputs], "start_times": [o.start_time for o in outputs],
        "queue_times": [o.client_queue_time for o in outputs],
        "generated_texts": [o.generated_text for o in outputs], "errors": [o.error for o in outputs],
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests, "rtfx": 0.0}
    for attr in _METRIC_HEADERS:
        if attr in selected_metrics:
            s = metrics.stats_ms[attr]
            result.update({f"mean_{attr}_ms": s["mean"], f"median_{attr}_ms": s["median"],
                           f"std_{attr}_ms": s["std"]})
            result.update({f"p{_pword(p)}_{attr}_ms": v for p, v in s["percentiles"]})
    return result


