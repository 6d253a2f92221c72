r"""``lmserve bench serve``: online serving benchmark against any OpenAI-compatible server.

Prints the same result block as ``vllm bench serve`` (vLLM 0.32), with the same metric
definitions, so that the two can be read side by side::

    lmserve serve --port 8123 &
    lmserve bench serve --port 8123 --random-input-len 128 --random-output-len 128 \
        --num-prompts 16 --max-concurrency 16

Metric definitions (as vLLM's ``calculate_metrics``; all per successful request):

- TTFT: time from sending the request to the first SSE chunk that carries ``choices``.
- ITL: one entry per later chunk with ``choices``: the time since the previous such chunk. A chunk
  that carries k tokens still counts once (vLLM does the same), so ITL is per chunk, TPOT per token.
- E2EL: time from sending the request to the last chunk with ``choices`` (not to ``[DONE]``).
- TPOT: ``(E2EL - TTFT) / (output_tokens - 1)`` for requests with more than one output token.
- Output tokens: ``usage.completion_tokens`` of the final usage chunk; else the tokenizer's count of
  the generated text; else (no tokenizer) the number of chunks (vLLM would count 1).
- Input tokens: ``usage.prompt_tokens`` when the server reports it, else the client's count.
- Throughputs divide by the benchmark duration (first request sent to last request done).

Prompts are vLLM's random dataset: per request a run of consecutive allowed token ids from a
random offset, after a shared random prefix of ``--random-prefix-len`` ids, decoded to text with
the tokenizer and re-encoded to the target length (so the server re-tokenizes to about the same
length). With ``--random-use-token-ids``, or when no tokenizer can be loaded, prompts are sent as
token-id lists (``/v1/completions`` accepts them). The tokenizer is ``--tokenizer``, else the model
path the server reports as ``root`` in ``/v1/models`` (or the model id) when it exists locally.

Differences from ``vllm bench serve`` defaults, chosen for this project: ``--ignore-eos`` is on
(``--no-ignore-eos`` turns it off), ``--temperature`` is 0, and ``--percentile-metrics`` defaults to
``ttft,tpot,itl,e2el`` (vLLM: ``ttft,tpot,itl``; pass ``--percentile-metrics ttft,tpot,itl,e2el``
to vLLM for the identical block). An SSE ``data: {"error": ...}`` line fails the request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

_MAX_REPORTED_ERRORS = 10
_HTTP_TIMEOUT_S = 6 * 60 * 60.0  # vLLM's aiohttp total timeout



from lmserve.benchmarks.datasets import DEFAULT_RANDOM_VOCAB_SIZE, arrival_offsets, sample_random_requests  # noqa: E402
from lmserve.benchmarks.metrics import (RequestOutput, SampleRequest, calculate_metrics, format_result_block,
                                        result_dict)  # noqa: E402

# ----------------------------------------------------------------------------- one request
@dataclass
class RequestSpec:
    """Everything a request needs beyond its ``SampleRequest``."""

    api_url: str
    model: str
    chat: bool = False
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def build_payload(spec: RequestSpec, req: SampleRequest) -> dict[str, Any]:
    """The streaming request body, as vLLM's ``openai`` / ``openai-chat`` request functions build it."""
    if spec.chat:
        if not isinstance(req.prompt, str):
            raise ValueError("the chat endpoint needs text prompts: give --tokenizer")
        body: dict[str, Any] = {"model": spec.model, "max_completion_tokens": req.expected_output_len,
                                "messages": [{"role": "user",
                                              "content": [{"type": "text", "text": req.prompt}]}]}
    else:
        body = {"model": spec.model, "prompt": req.prompt, "repetition_penalty": 1.0,
                "max_tokens": req.expected_output_len, "logprobs": None}
    body.update(stream=True, stream_options={"include_usage": True})
    if spec.ignore_eos:
        body["ignore_eos"] = True
    body.update(spec.extra_body)
    return body


async def send_request(client: Any, spec: RequestSpec, req: SampleRequest) -> RequestOutput:
    """POSTs one streaming request and times it. Never raises: failures are ``success=False``
    with ``error`` set (non-200 status, an SSE error payload, no chunk with choices, an exception)."""
    out = RequestOutput(prompt_len=req.prompt_len)
    headers = dict(spec.headers)
    if req.request_id:
        headers["x-request-id"] = req.request_id
    text: list[str] = []
    got_first = False
    st = last = time.perf_counter()
    out.start_time = st
    try:
        async with client.stream("POST", spec.api_url, json=build_payload(spec, req), headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                out.error = f"HTTP {resp.status_code}: {body[:500]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (": ping"), event/id fields
                data = line[5:].strip()
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if choices := chunk.get("choices"):
                    now = time.perf_counter()
                    if got_first:
                        out.itl.append(now - last)
                    else:
                        got_first, out.ttft = True, now - st
                    last = now
                    c = choices[0]
                    piece = (c.get("delta") or {}).get("content") if spec.chat else c.get("text")
                    text.append(piece or "")
                elif usage := chunk.get("usage"):
                    out.output_tokens = int(usage.get("completion_tokens") or 0)
                    if usage.get("prompt_tokens") is not None:
                        out.prompt_len = int(usage["prompt_tokens"])
                elif "error" in chunk:
                    err = chunk["error"]
                    out.error = str(err.get("message", err) if isinstance(err, dict) else err)
        out.generated_text = "".join(text)
        out.latency = last - st
        if out.error:
            return out
        if not got_first:
            out.error = "Never received a valid chunk to calculate TTFT."
            return out
        out.success = True
    except Exception:  # noqa: BLE001 - a benchmark records failures, it does not stop on them
        out.error = traceback.format_exc()
    return out


# ----------------------------------------------------------------------------- the run
async def get_first_model(client: Any, base_url: str, headers: dict[str, str]) -> tuple[str, str | None]:
    """(id, root) of the first model of ``GET /v1/models``."""
    resp = await client.get(f"{base_url}/v1/models", headers=headers)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"No models found on the server at {base_url}.")
    return data[0]["id"], data[0].get("root")


async def align_prompts_to_server(client: Any, base_url: str, model: str, requests: list[SampleRequest],
                                  headers: dict[str, str]) -> list[SampleRequest]:
    """vLLM's ``_align_prompts_to_server_tokenizer``: when the server's ``/tokenize`` counts the first
    text prompt differently, cut each longer prompt to its intended length with ``/detokenize``.
    Skipped (unchanged requests) when the server has no ``/tokenize``."""
    if not requests or not isinstance(requests[0].prompt, str):
        return requests

    async def tokenize(prompt: str) -> list[int]:
        r = await client.post(f"{base_url}/tokenize", headers=headers,
                              json={"model": model, "prompt": prompt, "add_special_tokens": False})
        r.raise_for_status()
        return r.json()["tokens"]

    try:
        first = await tokenize(requests[0].prompt)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001
        print("WARNING: /tokenize unavailable, skipping alignment.")
        return requests
    if len(first) == requests[0].prompt_len:
        return requests
    print(f"WARNING: tokenizer mismatch (server={len(first)}, expected={requests[0].prompt_len}), "
          "re-aligning prompts.")
    sem = asyncio.Semaphore(64)

    async def fix(req: SampleRequest) -> SampleRequest:
        async with sem:
            try:
                ids = await tokenize(req.prompt)  # type: ignore[arg-type]
                if len(ids) <= req.prompt_len:
                    return req
                r = await client.post(f"{base_url}/detokenize", headers=headers,
                                      json={"model": model, "tokens": ids[:req.prompt_len]})
                r.raise_for_status()
                return SampleRequest(r.json()["prompt"], req.prompt_len, req.expected_output_len, req.request_id)
            except Exception:  # noqa: BLE001
                return req

    return list(await asyncio.gather(*(fix(r) for r in requests)))


async def run_requests(client: Any, spec: RequestSpec, requests: list[SampleRequest], request_rate: float,
                       burstiness: float, max_concurrency: int | None, seed: int = 0,
                       disable_tqdm: bool = True) -> tuple[list[RequestOutput], float]:
    """Sends every request at its arrival time, at most ``max_concurrency`` in flight; returns the
    outputs (in request order) and the duration from the first send to the last completion."""
    offsets = arrival_offsets(len(requests), request_rate, burstiness, np.random.default_rng(seed))
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    pbar = None
    if not disable_tqdm:
        from tqdm import tqdm

        pbar = tqdm(total=len(requests))

    async def limited(req: SampleRequest) -> RequestOutput:
        arrival = time.perf_counter()
        if sem is None:
            out = await send_request(client, spec, req)
        else:
            async with sem:
                out = await send_request(client, spec, req)
        out.client_queue_time = out.start_time - arrival
        if pbar is not None:
            pbar.update(1)
        return out

    start = time.perf_counter()
    tasks = []
    for req, offset in zip(requests, offsets):
        delay = start + offset - time.perf_counter()
        if offset > 0 and delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(limited(req)))
    outputs = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - start
    if pbar is not None:
        pbar.close()
    return outputs, duration


def load_tokenizer(tokenizer: str | None, candidates: list[str | None], mode: str = "auto") -> tuple[Any, str | None]:
    """``--tokenizer`` (must load), else the first local candidate path that loads; else (None, None)."""
    from lmserve.tokenizer import get_tokenizer

    if tokenizer:
        return get_tokenizer(tokenizer, tokenizer_mode=mode), tokenizer
    for path in candidates:
        if path and os.path.exists(path):
            try:
                return get_tokenizer(path, tokenizer_mode=mode), path
            except Exception as e:  # noqa: BLE001 - fall back to the server's usage counts
                print(f"WARNING: could not load a tokenizer from {path} ({e}); counting tokens from usage.")
    return None, None


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the whole benchmark for parsed ``args``; prints the result block; returns vLLM's result JSON."""
    import httpx

    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    api_url = f"{base_url}{args.endpoint}"
    headers = {k: v for k, v in (h.split("=", 1) for h in (args.header or []))}
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    limits = httpx.Limits(max_connections=args.max_concurrency or None, max_keepalive_connections=None)
    timeout = httpx.Timeout(_HTTP_TIMEOUT_S, connect=60.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        root = None
        if args.model is None:
            try:
                args.model, root = await get_first_model(client, base_url, headers)
            except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as e:
                raise SystemExit(f"lmserve bench serve: cannot list models at {base_url}/v1/models "
                                 f"(is the server running?): {e!r}") from e
        tokenizer, tokenizer_id = load_tokenizer(args.tokenizer, [root, args.model], args.tokenizer_mode)
        if tokenizer is None:
            print("No local tokenizer: prompts are token ids; output tokens come from the server's usage.")
        requests = sample_random_requests(
            args.num_prompts, args.random_input_len, args.random_output_len, args.random_prefix_len,
            args.random_range_ratio, args.seed, tokenizer, args.random_use_token_ids, args.random_vocab_size,
            args.request_id_prefix)
        requests = await align_prompts_to_server(client, base_url, args.model, requests, headers)
        extra_body = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                         ("top_k", args.top_k), ("min_p", args.min_p)) if v is not None}
        extra_body.update(json.loads(args.extra_body) if args.extra_body else {})
        spec = RequestSpec(api_url=api_url, model=args.served_model_name or args.model,
                           chat=args.endpoint.rstrip("/").endswith("chat/completions"),
                           ignore_eos=args.ignore_eos, extra_body=extra_body, headers=headers)
        if spec.chat and not isinstance(requests[0].prompt, str):
            raise SystemExit("lmserve bench serve: the chat endpoint needs text prompts: give --tokenizer "
                             "(and leave out --random-use-token-ids).")
        await _ready_and_warm_up(client, spec, requests[0], args)
        print("Starting main benchmark run...")
        print(f"Traffic request rate: {args.request_rate}")
        dist = "Poisson process" if args.burstiness == 1.0 else "Gamma distribution"
        print(f"Burstiness factor: {args.burstiness} ({dist})")
        print(f"Maximum request concurrency: {args.max_concurrency}")
        outputs, duration = await run_requests(client, spec, requests, args.request_rate, args.burstiness,
                                               args.max_concurrency, args.seed, args.disable_tqdm)
    selected = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    metrics, output_lens = calculate_metrics(outputs, duration, percentiles, tokenizer)
    failed = [o for o in outputs if not o.success]
    if failed:
        print(f"Failed requests during benchmark run detected (capping to {_MAX_REPORTED_ERRORS}):")
        for i, o in enumerate(failed[:_MAX_REPORTED_ERRORS]):
            print(f"Error {i}: {o.error}")
    print(format_result_block(metrics, duration, args.max_concurrency, args.request_rate, selected))
    result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": args.backend,
              "backend": args.backend, "label": args.label, "model_id": args.model, "tokenizer_id": tokenizer_id,
              "num_prompts": args.num_prompts,
              "request_rate": args.request_rate if not math.isinf(args.request_rate) else "inf",
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
              **result_dict(metrics, outputs, output_lens, duration, selected)}
    if not args.save_detailed:
        for key in ("input_lens", "output_lens", "start_times", "ttfts", "itls", "generated_texts", "errors"):
            result.pop(key, None)
    return result


async def _ready_and_warm_up(client: Any, spec: RequestSpec, first: SampleRequest, args: argparse.Namespace) -> None:
    """``--ready-check-timeout-sec``: retry the first prompt until it succeeds; then ``--num-warmups``
    copies of it (all outside the timed run)."""
    if args.ready_check_timeout_sec > 0:
        print("Starting initial single prompt test run...")
        deadline = time.monotonic() + args.ready_check_timeout_sec
        while True:
            out = await send_request(client, spec, first)
            if out.success:
                print("Initial test run completed.")
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Initial test run failed: {out.error}")
            await asyncio.sleep(1.0)
    else:
        print("Skipping endpoint ready check.")
    if args.num_warmups > 0:
        print(f"Warming up with {args.num_warmups} requests...")
        sem = asyncio.Semaphore(args.max_concurrency or args.num_warmups)

        async def one() -> RequestOutput:
            async with sem:
                return await send_request(client, spec, first)

        await asyncio.gather(*(one() for _ in range(args.num_warmups)))
        print("Warmup run completed.")


# ----------------------------------------------------------------------------- CLI
def make_parser() -> argparse.ArgumentParser:
    """Flags named and defaulted as ``vllm bench serve``'s, except where the module docstring says."""
    p = argparse.ArgumentParser(prog="lmserve bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="openai", choices=["openai", "openai-chat", "vllm"],
                   help="openai-chat implies --endpoint /v1/chat/completions.")
    p.add_argument("--label", default=None, help="Result label (default: the backend).")
    p.add_argument("--base-url", default=None, help="Server base URL (default: http://HOST:PORT).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=None, help="/v1/completions (default) or /v1/chat/completions.")
    p.add_argument("--header", nargs="*", metavar="KEY=VALUE", help="Extra request headers.")
    p.add_argument("--api-key", default=None, help="Bearer token (default: $OPENAI_API_KEY).")
    p.add_argument("--model", default=None, help="Model id (default: the first of GET /v1/models).")
    p.add_argument("--served-model-name", default=None, help="The model name sent in requests (default: --model).")
    p.add_argument("--tokenizer", default=None, help="Tokenizer path (default: the server's model root if local).")
    p.add_argument("--tokenizer-mode", default="auto", choices=["auto", "hf", "slow"])
    p.add_argument("--dataset-name", default="random", choices=["random"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=None, help="Alias of --random-input-len.")
    p.add_argument("--output-len", type=int, default=None, help="Alias of --random-output-len.")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-prefix-len", type=int, default=0, help="Shared prefix tokens before each prompt.")
    p.add_argument("--random-range-ratio", default="0.0",
                   help='Length range ratio in [0, 1), or JSON {"input": a, "output": b}.')
    p.add_argument("--random-use-token-ids", action="store_true",
                   help="Send prompts as token-id lists (the default when no tokenizer is available).")
    p.add_argument("--random-vocab-size", type=int, default=DEFAULT_RANDOM_VOCAB_SIZE,
                   help="Token-id range when there is no tokenizer (ids 256..N-1).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Requests per second (inf: all at once; else Poisson/gamma arrivals).")
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of arrival gaps; 1 = Poisson.")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="Send ignore_eos (default on, so every request makes exactly its output length).")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body.")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                   help="Comma-separated: ttft, tpot, itl, e2el, client_queue_time, e2el_including_client_queue.")
    p.add_argument("--metric-percentiles", default="99", help='Comma-separated percentiles, e.g. "50,90,99".')
    p.add_argument("--num-warmups", type=int, default=0, help="Untimed requests before the run.")
    p.add_argument("--ready-check-timeout-sec", type=int, default=0,
                   help="Retry a first test request this long before starting (0: skip).")
    p.add_argument("--request-id-prefix", default=f"bench-{uuid.uuid4().hex[:8]}-")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--save-result", action="store_true", help="Save the result JSON.")
    p.add_argument("--save-detailed", action="store_true", help="Keep per-request lists in the JSON.")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses and normalises (aliases, endpoint from backend, label)."""
    args = make_parser().parse_args(argv)
    if args.input_len is not None:
        args.random_input_len = args.input_len
    if args.output_len is not None:
        args.random_output_len = args.output_len
    if args.endpoint is None:
        args.endpoint = "/v1/chat/completions" if args.backend == "openai-chat" else "/v1/completions"
    if args.endpoint.rstrip("/").endswith("chat/completions"):
        args.backend = "openai-chat"
    args.label = args.label or args.backend
    return args


def result_filename(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """vLLM's name: ``{label}-{rate}qps[-concurrencyN]-{model}-{date}.json`` unless given."""
    conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    name = args.result_filename or (f"{args.label}-{args.request_rate}qps{conc}-"
                                    f"{os.path.basename(str(args.model).rstrip('/'))}-{result['date']}.json")
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        name = os.path.join(args.result_dir, name)
    return name


def main(argv: list[str] | None = None) -> int:
    """``lmserve bench serve``. Returns 0, or 1 when no request succeeded."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    print({k: ("<redacted>" if k in ("api_key", "header") and v else v) for k, v in vars(args).items()})
    result = asyncio.run(benchmark(args))
    if args.save_result:
        path = result_filename(args, result)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f)
        print(f"Saved the result to {path}")
    return 0 if result["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

