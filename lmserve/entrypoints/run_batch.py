"""``lmserve run-batch``: OpenAI batch files, as ``vllm run-batch`` (vLLM 0.32) runs them.

Input: a JSONL file, one request a line: ``{"custom_id", "method": "POST", "url", "body"}``.
Output: a JSONL file, one line per input line and in the same order:
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``. A request
that succeeds has ``body`` set and ``error`` null; one the server answers with an error has
``body`` null and ``error`` the OpenAI error object (``{"error": {...}}``) with ``status_code``
its HTTP status; a line that cannot be run at all (bad JSON, missing fields, an unsupported url,
``stream: true``) gets ``status_code`` 400 and ``error`` a message string, as vLLM's
``make_error_request_output``. A bad line never stops the batch.

Each line runs through the very app ``lmserve serve`` serves (in process, over ASGI, no socket),
so validation, defaults and response bodies are the server's. All lines run concurrently
through one engine (at most ``max(2 * --max-num-seqs, 8)`` in flight, so a large file does not
queue everything at once).

The urls are vLLM's run-batch ones that lmserve serves (``/v1/chat/completions``,
``/v1/embeddings``, ``.../score``, ``.../rerank``) plus ``/v1/completions``; vLLM's audio urls
need audio models, which lmserve does not serve. Input and output are local paths: http(s)
urls are refused with a message (this build reads and writes local files only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import uuid
from typing import Any

logger = logging.getLogger("lmserve.run_batch")

# url -> the route of the serve app that answers it (vLLM matches /score and /rerank by suffix).
_EXACT_URLS = {"/v1/chat/completions": "/v1/chat/completions", "/v1/completions": "/v1/completions",
               "/v1/embeddings": "/v1/embeddings"}
SUPPORTED_URLS_TEXT = "/v1/chat/completions, /v1/completions, /v1/embeddings, /score, /rerank"


def add_batch_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags ``vllm run-batch`` adds to the engine flags (the serve flags are added by the caller)."""
    g = parser.add_argument_group("batch")
    g.add_argument("-i", "--input-file", required=True, help="The batch file (JSONL), a local path.")
    g.add_argument("-o", "--output-file", required=True, help="Where the results go (JSONL), a local path.")
    g.add_argument("--output-tmp-dir", default=None,
                   help="vLLM stages an uploaded output here; outputs are local files on this build, so it "
                        "is only accepted when given with a local --output-file (and then unused).")
    g.add_argument("--enable-metrics", action="store_true",
                   help="Refused: run-batch exports no Prometheus metrics on this build.")
    g.add_argument("--url", default=None, help="Deprecated in vLLM (the metrics host); refused as --enable-metrics.")
    return parser


def check_batch_args(args: argparse.Namespace) -> str | None:
    """The reason the batch flags cannot run, or None."""
    for flag, path in (("--input-file", args.input_file), ("--output-file", args.output_file)):
        if path.startswith(("http://", "https://")):
            return (f"{flag} {path}: http(s) urls are not supported: lmserve run-batch reads and writes local "
                    "files only (no network access). Download the file first, or upload the output after.")
    if args.enable_metrics or args.url is not None:
        return ("--enable-metrics / --url are not supported by lmserve run-batch: it exports no Prometheus "
                "metrics. Use `lmserve serve` and GET /metrics to watch a long run.")
    if not os.path.isfile(args.input_file):
        return f"--input-file {args.input_file}: no such file"
    return None


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_line(custom_id: Any, message: str, status_code: int = 400) -> dict[str, Any]:
    """A line that could not be run (vLLM's ``make_error_request_output``)."""
    return {"id": _new_id("vllm"), "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": _new_id("vllm-batch"), "body": None},
            "error": message}


def parse_line(text: str) -> tuple[Any, str | None, dict[str, Any] | None, str | None]:
    """``(custom_id, route, body, error)`` for one input line; ``error`` is set when the line
    cannot be run (then ``custom_id`` is the line's own where it has a string one, else None)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        return None, None, None, f"The line is not valid JSON: {e}"
    if not isinstance(data, dict):
        return None, None, None, "A batch line must be a JSON object with custom_id, method, url and body."
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str):
        return None, None, None, "custom_id is required and must be a string."
    missing = [k for k in ("method", "url", "body") if k not in data]
    if missing:
        return custom_id, None, None, f"The line lacks {', '.join(missing)}."
    method, url, body = data["method"], data["url"], data["body"]
    if method != "POST":
        return custom_id, None, None, f"method {method!r} is not supported: batch requests are POST."
    if not isinstance(body, dict):
        return custom_id, None, None, "body must be a JSON object (the request body)."
    route = _EXACT_URLS.get(url) if isinstance(url, str) else None
    if route is None and isinstance(url, str) and url.endswith(("/score", "/rerank")):
        route = "/score" if url.endswith("/score") else "/rerank"
    if route is None:
        return custom_id, None, None, f"URL {url} was used. Supported endpoints: {SUPPORTED_URLS_TEXT}."
    if body.get("stream"):
        return custom_id, None, None, "Request must not be sent in stream mode"
    return custom_id, route, body, None


async def run_line(client: Any, text: str) -> dict[str, Any]:
    """One output line for one input line (never raises for a bad line or a failed request)."""
    custom_id, route, body, error = parse_line(text)
    if error is not None:
        return error_line(custom_id, error)
    request_id = _new_id("vllm-batch")
    try:
        resp = await client.post(route, json=body, headers={"X-Request-Id": request_id})
        payload = resp.json()
    except Exception as e:  # noqa: BLE001 - reported on the line, the batch goes on
        logger.exception("Batch request %s failed", custom_id)
        return error_line(custom_id, f"Internal error: {type(e).__name__}: {e}", 500)
    ok = resp.status_code == 200
    return {"id": _new_id("vllm"), "custom_id": custom_id,
            "response": {"status_code": resp.status_code, "request_id": request_id, "body": payload if ok else None},
            "error": None if ok else payload}


async def run_batch_lines(app: Any, lines: list[str], concurrency: int) -> list[dict[str, Any]]:
    """Runs every non-empty line through ``app`` (the serve app), ``concurrency`` at a time; the
    outputs are in input order."""
    import httpx

    limit = asyncio.Semaphore(max(1, concurrency))

    async def one(client: Any, text: str) -> dict[str, Any]:
        async with limit:
            return await run_line(client, text)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://lmserve-batch", timeout=None) as client:
        return await asyncio.gather(*(one(client, t) for t in lines))


async def run_batch(args: argparse.Namespace) -> int:
    from lmserve.engine.arg_utils import EngineArgs
    from lmserve.engine.async_engine import AsyncLLM
    from lmserve.entrypoints.openai.app import build_app

    with open(args.input_file, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().split("\n")]
    lines = [line for line in lines if line]
    logger.info("Read %d request(s) from %s", len(lines), args.input_file)
    args.api_key = None  # in process: no client to authenticate
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    engine = await asyncio.to_thread(AsyncLLM.from_engine_args, EngineArgs.from_cli_args(args))
    app = build_app(args, engine)
    try:
        concurrency = max(2 * int(getattr(args, "max_num_seqs", None) or 4), 8)
        outputs = await run_batch_lines(app, lines, concurrency)
    finally:
        engine.shutdown()
        await app.state.server.aclose()
    tmp = args.output_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for out in outputs:
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    os.replace(tmp, args.output_file)
    failed = sum(1 for o in outputs if o["error"] is not None)
    logger.info("Wrote %d result(s) to %s (%d with an error)", len(outputs), args.output_file, failed)
    return 0


def main_run_batch(args: argparse.Namespace) -> int:
    reason = check_batch_args(args)
    if reason is not None:
        print(f"lmserve run-batch: error: {reason}", file=__import__("sys").stderr)
        return 2
    if args.output_tmp_dir is not None:
        logger.info("--output-tmp-dir %s changes nothing here: the output is written to a local file",
                    args.output_tmp_dir)
    for line in getattr(args, "noop_flags", ()):
        logger.info("%s", line)
    return asyncio.run(run_batch(args))
