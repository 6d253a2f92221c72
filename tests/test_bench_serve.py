"""``lmserve bench serve``: metric math on synthetic timings (exact values), the random dataset,
arrival times, the result block's layout, and end-to-end runs against an in-process fake SSE server
(controlled delays, no model) and against a real ``lmserve serve`` on a tiny random Llama."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fastapi import FastAPI, Request  # module level: the routes' annotations are resolved here
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.benchmarks import serve as bench
from lmserve.benchmarks.serve import RequestOutput, calculate_metrics, format_result_block

pytest.importorskip("httpx")


# ----------------------------------------------------------------------------- metric math
def _synthetic_outputs() -> list[RequestOutput]:
    return [
        RequestOutput(success=True, prompt_len=10, output_tokens=4, ttft=0.1, itl=[0.02, 0.03, 0.05],
                      latency=0.2, start_time=0.0),
        RequestOutput(success=True, prompt_len=20, output_tokens=2, ttft=0.3, itl=[0.1], latency=0.4,
                      start_time=1.5),
        RequestOutput(success=True, prompt_len=5, output_tokens=1, ttft=0.05, itl=[], latency=0.05,
                      start_time=0.15),
        RequestOutput(success=False, prompt_len=7, error="boom", start_time=0.0),
    ]


def test_metrics_exact():
    m, lens = calculate_metrics(_synthetic_outputs(), duration_s=2.0, percentiles=[50, 99])
    assert (m.completed, m.failed) == (3, 1)
    assert lens == [4, 2, 1, 0]
    assert (m.total_input, m.total_output) == (35, 7)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(21.0)
    s = m.stats_ms
    # TPOT = (e2el - ttft) / (n - 1), only for n > 1: [100/3, 100] ms
    assert s["tpot"]["mean"] == pytest.approx((100 / 3 + 100) / 2)
    assert s["tpot"]["median"] == pytest.approx((100 / 3 + 100) / 2)
    assert dict(s["tpot"]["percentiles"])[99] == pytest.approx(100 / 3 + 0.99 * (100 - 100 / 3))
    # ITL: all chunks of all requests [20, 30, 50, 100] ms
    assert s["itl"]["mean"] == pytest.approx(50.0)
    assert s["itl"]["median"] == pytest.approx(40.0)
    assert dict(s["itl"]["percentiles"])[99] == pytest.approx(50 + 0.97 * 50)  # rank 0.99 * 3 = 2.97
    assert dict(s["itl"]["percentiles"])[50] == pytest.approx(40.0)
    # TTFT [100, 300, 50] ms; E2EL [200, 400, 50] ms
    assert s["ttft"]["mean"] == pytest.approx(150.0)
    assert s["ttft"]["median"] == pytest.approx(100.0)
    assert dict(s["ttft"]["percentiles"])[99] == pytest.approx(100 + 0.98 * 200)
    assert s["e2el"]["mean"] == pytest.approx(650 / 3)
    assert s["e2el"]["std"] == pytest.approx(float(np.std([200, 400, 50])))
    # requests in flight: [0, .2), [1.5, 1.9), [.15, .2) -> 2 at once at most
    assert m.max_concurrent_requests == 2
    # tokens at .1 .12 .15 .2 (request 0), 1.8 1.9 (request 1), .2 (request 2): 5 in second 0, 2 in second 1
    assert m.max_output_tokens_per_s == 5.0


def test_metrics_fallbacks():
    """No usage: the tokenizer's count, else the number of chunks; nothing succeeded: zeros."""
    out = RequestOutput(success=True, prompt_len=3, ttft=0.1, itl=[0.1, 0.1], latency=0.3, generated_text="a b")
    m, lens = calculate_metrics([out], 1.0, [99])
    assert lens == [3] and m.stats_ms["tpot"]["mean"] == pytest.approx(100.0)

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": text.split()})()

    m, lens = calculate_metrics([out], 1.0, [99], tokenizer=Tok())
    assert lens == [2] and m.stats_ms["tpot"]["mean"] == pytest.approx(200.0)
    m, lens = calculate_metrics([RequestOutput(success=False, error="x")], 1.0, [99])
    assert m.completed == 0 and m.stats_ms["ttft"]["mean"] == 0.0 and m.max_concurrent_requests == 0


def test_result_block_layout():
    m, _ = calculate_metrics(_synthetic_outputs(), 2.0, [99])
    block = format_result_block(m, 2.0, max_concurrency=4, request_rate=math.inf,
                                selected_metrics=["ttft", "tpot", "itl", "e2el"])
    lines = block.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    labels = [ln[:40].rstrip() for ln in lines[1:-1] if not ln.startswith("-")]
    assert labels == [
        "Successful requests:", "Failed requests:", "Maximum request concurrency:", "Benchmark duration (s):",
        "Total input tokens:", "Total generated tokens:", "Request throughput (req/s):",
        "Output token throughput (tok/s):", "Peak output token throughput (tok/s):", "Peak concurrent requests:",
        "Total token throughput (tok/s):",
        "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):",
        "Mean TPOT (ms):", "Median TPOT (ms):", "P99 TPOT (ms):",
        "Mean ITL (ms):", "Median ITL (ms):", "P99 ITL (ms):",
        "Mean E2EL (ms):", "Median E2EL (ms):", "P99 E2EL (ms):"]
    headers = [ln for ln in lines if ln.startswith("-")]
    assert headers == ["---------------Time to First Token----------------",
                       "-----Time per Output Token (excl. 1st token)------",
                       "---------------Inter-token Latency----------------",
                       "----------------End-to-end Latency----------------"]
    assert "Successful requests:                     3         " in lines
    assert "Mean TTFT (ms):                          150.00    " in lines
    rate_block = format_result_block(m, 2.0, None, 2.5, ["e2el"])
    assert "Request rate configured (RPS):           2.50      " in rate_block.splitlines()
    assert "Maximum request concurrency:" not in rate_block and "TTFT" not in rate_block


# ----------------------------------------------------------------------------- dataset, arrivals
def test_random_token_id_prompts():
    reqs = bench.sample_random_requests(8, 32, 16, prefix_len=5, seed=1, vocab_size=1000)
    again = bench.sample_random_requests(8, 32, 16, prefix_len=5, seed=1, vocab_size=1000)
    assert [r.prompt for r in reqs] == [r.prompt for r in again]
    assert all(isinstance(r.prompt, list) and r.prompt_len == 37 == len(r.prompt) for r in reqs)
    assert all(r.expected_output_len == 16 for r in reqs)
    assert len({tuple(r.prompt[:5]) for r in reqs}) == 1  # the shared prefix
    assert len({tuple(r.prompt[5:]) for r in reqs}) == 8
    assert all(256 <= t < 1000 for r in reqs for t in r.prompt)
    ranged = bench.sample_random_requests(200, 100, 10, range_ratio="0.5", seed=0)
    assert {r.prompt_len for r in ranged} <= set(range(50, 151)) and len({r.prompt_len for r in ranged}) > 20
    assert {r.expected_output_len for r in ranged} <= set(range(5, 16))
    split = bench.sample_random_requests(50, 100, 10, range_ratio='{"input": 0.0, "output": 0.5}')
    assert {r.prompt_len for r in split} == {100}


def test_random_text_prompts(smollm2_tokenizer_dir):
    from lmserve.tokenizer import get_tokenizer

    tok = get_tokenizer(smollm2_tokenizer_dir)
    reqs = bench.sample_random_requests(6, 64, 8, prefix_len=16, seed=0, tokenizer=tok)
    for r in reqs:
        assert isinstance(r.prompt, str)
        assert abs(len(tok.encode(r.prompt, add_special_tokens=False)) - 80) <= 2
    ids = bench.sample_random_requests(2, 64, 8, seed=0, tokenizer=tok, use_token_ids=True)
    assert all(isinstance(r.prompt, list) and len(r.prompt) == 64 for r in ids)


def test_arrival_offsets():
    assert bench.arrival_offsets(4, math.inf) == [0.0] * 4
    t = bench.arrival_offsets(100, 10.0, 1.0, np.random.default_rng(0))
    assert t == sorted(t) and t[-1] == pytest.approx(10.0)
    assert bench.arrival_offsets(4, 2.0, math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    with pytest.raises(ValueError):
        bench.arrival_offsets(3, 1.0, 0.0)


# ----------------------------------------------------------------------------- fake server
TTFT_DELAY, CHUNK_DELAY = 0.15, 0.01


def _fake_app(tokens_per_chunk: int = 1):
    """Streams ``max_tokens`` tokens: first chunk after TTFT_DELAY, then one chunk per CHUNK_DELAY;
    a request whose id ends in "-0" fails with 500 (to count failures)."""
    app = FastAPI()
    seen: list[dict] = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "root": "/nonexistent/fake"}]}

    async def handle(request: Request, chat: bool):
        body = await request.json()
        seen.append({"body": body, "headers": dict(request.headers)})
        if request.headers.get("x-request-id", "").endswith("-0"):
            return JSONResponse({"error": {"message": "fake failure", "type": "x", "param": None, "code": 500}},
                                status_code=500)
        n = body.get("max_completion_tokens" if chat else "max_tokens")
        prompt_len = len(body["prompt"]) if not chat else 7

        async def gen():
            await asyncio.sleep(TTFT_DELAY)
            if chat:
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n"
            sent = 0
            while sent < n:
                k = min(tokens_per_chunk, n - sent)
                piece = " tok" * k
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                yield ": ping\n\n" if sent == 1 else ""
                yield "data: " + json.dumps({"choices": [choice]}) + "\n\n"
                sent += k
                if sent < n:
                    await asyncio.sleep(CHUNK_DELAY)
            usage = {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app, seen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_server(request):
    import uvicorn

    app, seen = _fake_app(getattr(request, "param", 1))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(timeout=10)


def test_end_to_end_fake_server(fake_server, tmp_path, capsys):
    base, seen = fake_server
    out_file = tmp_path / "r.json"
    rc = bench.main(["--base-url", base, "--num-prompts", "6", "--random-input-len", "12",
                     "--random-output-len", "5", "--max-concurrency", "3", "--disable-tqdm", "--api-key", "sk-x",
                     "--request-id-prefix", "t-", "--save-result", "--save-detailed",
                     "--result-filename", str(out_file)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in printed
    assert "Error 0: HTTP 500" in printed and "sk-x" not in printed
    r = json.loads(out_file.read_text())
    assert (r["completed"], r["failed"]) == (5, 1)
    assert r["model_id"] == "fake-model" and r["tokenizer_id"] is None and r["max_concurrency"] == 3
    assert r["total_input_tokens"] == 5 * 12 and r["total_output_tokens"] == 5 * 5
    ok = [i for i, e in enumerate(r["errors"]) if not e]
    assert len(ok) == 5 and all(len(r["itls"][i]) == 4 for i in ok)
    for i in ok:
        assert TTFT_DELAY * 0.9 <= r["ttfts"][i] < TTFT_DELAY + 2.0
        assert r["latencies"][i] >= TTFT_DELAY + 4 * CHUNK_DELAY * 0.9
        assert r["latencies"][i] == pytest.approx(r["ttfts"][i] + sum(r["itls"][i]))
    assert TTFT_DELAY * 900 <= r["mean_ttft_ms"] < (TTFT_DELAY + 2.0) * 1000
    assert r["mean_tpot_ms"] >= CHUNK_DELAY * 900 and "p99_e2el_ms" in r
    body, headers = seen[-1]["body"], seen[-1]["headers"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["max_tokens"] == 5
    assert isinstance(body["prompt"], list) and len(body["prompt"]) == 12  # token ids: no tokenizer
    assert headers["authorization"] == "Bearer sk-x" and headers["x-request-id"].startswith("t-")
    assert r["max_concurrent_requests"] <= 3


@pytest.mark.parametrize("fake_server", [3], indirect=True)
def test_multi_token_chunks_and_rate(fake_server, tmp_path):
    """3 tokens per chunk: one ITL per chunk, TPOT per token (usage count); Poisson arrivals."""
    base, _ = fake_server
    out_file = tmp_path / "r.json"
    rc = bench.main(["--base-url", base, "--num-prompts", "4", "--random-input-len", "8", "--random-output-len",
                     "9", "--request-rate", "20", "--disable-tqdm", "--request-id-prefix", "m-x",
                     "--save-result", "--save-detailed", "--result-filename", str(out_file)])
    assert rc == 0
    r = json.loads(out_file.read_text())
    assert r["completed"] == 4 and r["total_output_tokens"] == 36 and r["request_rate"] == 20.0
    assert all(len(itl) == 2 for itl in r["itls"])  # 3 chunks of 3 tokens
    tpots = [(lat - ttft) / 8 for lat, ttft in zip(r["latencies"], r["ttfts"])]
    assert r["mean_tpot_ms"] == pytest.approx(1000 * float(np.mean(tpots)))


def test_chat_endpoint_needs_text(fake_server, smollm2_tokenizer_dir, tmp_path):
    base, seen = fake_server
    with pytest.raises(SystemExit):
        bench.main(["--base-url", base, "--endpoint", "/v1/chat/completions", "--num-prompts", "2",
                    "--random-input-len", "8", "--random-output-len", "3", "--disable-tqdm"])
    out_file = tmp_path / "c.json"
    rc = bench.main(["--base-url", base, "--endpoint", "/v1/chat/completions", "--tokenizer", smollm2_tokenizer_dir,
                     "--num-prompts", "3", "--random-input-len", "8", "--random-output-len", "3", "--disable-tqdm",
                     "--request-id-prefix", "c-x", "--save-result", "--result-filename", str(out_file)])
    assert rc == 0
    r = json.loads(out_file.read_text())
    assert r["backend"] == "openai-chat" and r["completed"] == 3 and r["total_output_tokens"] == 9
    body = seen[-1]["body"]
    assert body["max_completion_tokens"] == 3 and body["messages"][0]["content"][0]["type"] == "text"


# ----------------------------------------------------------------------------- real server
@pytest.mark.slow
def test_end_to_end_lmserve(tiny_text_model, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lmserve.entrypoints.cli", "serve", tiny_text_model,
                             "--port", str(port), "--dtype", "float32", "--kv-cache-memory", "64MiB"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "server did not become healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        out_file = tmp_path / "r.json"
        rc = bench.main(["--port", str(port), "--num-prompts", "4", "--random-input-len", "16",
                         "--random-output-len", "8", "--max-concurrency", "2", "--disable-tqdm",
                         "--save-result", "--result-filename", str(out_file)])
        assert rc == 0
        r = json.loads(out_file.read_text())
        assert (r["completed"], r["failed"]) == (4, 0)
        assert r["total_output_tokens"] == 32  # ignore_eos: exactly max_tokens each
        assert r["tokenizer_id"] is not None  # loaded from the server's model root
        assert 4 * 14 <= r["total_input_tokens"] <= 4 * 18
        assert 0 < r["mean_ttft_ms"] <= r["mean_e2el_ms"] and r["mean_tpot_ms"] > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
