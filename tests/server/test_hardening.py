"""Issue 23's findings, one regression test (or more) each: hostile chat templates, blocking
renders, request-id collisions, lone surrogates, extreme length penalties, forged request ids,
oversized logs and bodies. Template and logging tests run in-process (a fake engine, the real
tiny tokenizer); the others against the tiny model's server."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lmserve.entrypoints.cli import make_parser
from lmserve.entrypoints.cli_args import parse_serve_args
from lmserve.entrypoints.openai.app import build_app
from tests.server.conftest import API_KEY
from tests.server.fake_engine import FakeAsyncLLM
from tests.server.tiny_model import build_tokenizer

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_app(tokenizer, *argv: str):
    _, serve = make_parser()
    return build_app(parse_serve_args(list(argv), serve), FakeAsyncLLM(tokenizer))


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60)


def assert_error(r: httpx.Response, status: int, text: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert text in err["message"], err
    return err


# ---------------------------------------------------------------------- 1, 2: request templates
@pytest.mark.anyio
async def test_request_template_needs_trust(tokenizer):
    app = make_app(tokenizer)
    async with asgi_client(app) as c:
        for path, body in (("/tokenize", {"messages": MSG, "chat_template": "{{ 1 }}"}),
                           ("/v1/chat/completions", {"messages": MSG, "chat_template": "{{ 1 }}"}),
                           ("/v1/chat/completions", {"messages": MSG,
                                                     "chat_template_kwargs": {"chat_template": "{{ 1 }}"}})):
            err = assert_error(await c.post(path, json=body), 400, "--trust-request-chat-template")
            assert err["param"] == "chat_template"
        assert (await c.post("/tokenize", json={"messages": MSG})).status_code == 200


@pytest.mark.anyio
async def test_constant_folding_bomb_is_a_quick_400(tokenizer):
    """Finding 1: jinja folded ``[0] * N`` while compiling (21 GB for N = 5e7)."""
    app = make_app(tokenizer, "--trust-request-chat-template")
    async with asgi_client(app) as c:
        for template in ("{% set s = [0] * 5000000 %}{{ s|length }}", "{{ 'x' * 50000000 }}",
                         "{{ 'x'|center(1000000000) }}", "{{ 'x'.ljust(1000000000) }}",
                         "{{ '%01000000000d' % 1 }}", "{{ 'x' * 1000 }}" * 200_000):
            start = time.monotonic()
            r = await c.post("/tokenize", json={"messages": MSG, "chat_template": template})
            assert_error(r, 400)
            assert time.monotonic() - start < 5
        ok = await c.post("/tokenize", json={"messages": MSG, "chat_template": "{{ messages[0].content }}"})
        assert ok.status_code == 200 and ok.json()["count"] >= 1
        await app.state.server.aclose()


@pytest.mark.anyio
async def test_slow_template_does_not_block_the_server(tokenizer):
    """Finding 2: two nested range(20000) loops froze /health for 25 s."""
    from lmserve.chat_template import TemplateLimits

    app = make_app(tokenizer, "--trust-request-chat-template")
    app.state.server.template_sandbox.limits = TemplateLimits(render_timeout_s=1.5)
    slow = "{% for i in range(20000) %}{% for j in range(20000) %}{% endfor %}{% endfor %}"
    async with asgi_client(app) as c:
        async def health_latencies() -> list[float]:
            out = []
            for _ in range(5):
                await asyncio.sleep(0.2)
                start = time.monotonic()
                assert (await c.get("/health")).status_code == 200
                out.append(time.monotonic() - start)
            return out

        render = c.post("/v1/chat/completions", json={"messages": MSG, "chat_template": slow, "max_tokens": 2})
        r, latencies = await asyncio.gather(render, health_latencies())
        assert_error(r, 400, "longer than")
        assert max(latencies) < 0.5, latencies
        ok = await c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2,
                                                        "chat_template": "{{ messages[0].content }}"})
        assert ok.status_code == 200, ok.text
        await app.state.server.aclose()


# ---------------------------------------------------------------------- 3: request-id collisions
def test_same_request_id_twice_both_complete(tiny_server, http):
    """Finding 3: the second got a 400 and the first never answered, leaking an in-flight slot."""
    def one(i: int) -> httpx.Response:
        with httpx.Client(base_url=tiny_server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=60) as c:
            kw = {"headers": {"X-Request-Id": "dup"}} if i % 2 else {}
            return c.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 24,
                                                   "ignore_eos": True, "request_id": "dup"}, **kw)

    for _ in range(2):
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(one, range(6)))
        for r in replies:
            assert r.status_code == 200, r.text
            assert r.json()["id"] == "cmpl-dup" and r.json()["usage"]["completion_tokens"] == 24
    assert http.get("/load").json()["server_load"] == 0
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200


# ---------------------------------------------------------------------- 4: lone surrogates
SURROGATE_BODIES = [
    ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800x", "max_tokens": 2}'),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
    ("/v1/completions", '{"model": "tiny", "prompt": "ok", "stop": ["\\ud800"], "max_tokens": 2}'),
    ("/v1/completions", '{"model": "tiny", "prompt": "ok", "bad_words": ["\\ud800"], "max_tokens": 2}'),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udc00"}]}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}'),
    ("/tokenize", '{"prompt": "\\ud800x"}'),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/completions", '{"model": "tiny", "prompt": "ok", "\\ud800": 1}'),
    ("/v1/completions", '{"model": "tiny", "prompt": "ok", "logit_bias": {"\\ud800": 1}}'),
    ("/v1/completions", '{"model": "tiny", "prompt": "ok", "vllm_xargs": {"k": ["\\udfff"]}}'),
]


@pytest.mark.parametrize("path,body", SURROGATE_BODIES)
def test_lone_surrogate_is_a_400_and_the_connection_lives(http, path, body):
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "surrogate")
    assert r.headers.get("connection") != "close"
    assert http.post("/tokenize", json={"prompt": "still here"}).status_code == 200


def test_lone_surrogate_on_pooling_routes(minilm_http):
    for path, body in (("/v1/embeddings", '{"input": "\\ud800"}'),
                       ("/v1/embeddings", '{"input": ["a", "b\\udfff"]}'),
                       ("/score", '{"text_1": "a", "text_2": "\\ud800"}'),
                       ("/rerank", '{"query": "\\ud800", "documents": ["a"]}'),
                       ("/v1/rerank", '{"query": "q", "documents": ["a", "\\udbff"]}')):
        r = minilm_http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert_error(r, 400, "surrogate")
    assert minilm_http.post("/v1/embeddings", json={"input": "fine"}).status_code == 200


# ---------------------------------------------------------------------- 5: length_penalty
BEAM = '{"model": "tiny", "prompt": "Hello", "max_tokens": 3, "n": 2, "use_beam_search": true, "length_penalty": %s}'


@pytest.mark.parametrize("value", ["-Infinity", "Infinity", "NaN"])
def test_non_finite_length_penalty_is_a_400(http, value):
    r = http.post("/v1/completions", content=BEAM % value, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "finite")


@pytest.mark.parametrize("value", ["1e308", "-1e308", "0"])
def test_extreme_finite_length_penalty_ranks_beams(http, value):
    for stream in (False, True):
        r = http.post("/v1/completions", content=(BEAM % value)[:-1] + f', "stream": {str(stream).lower()}}}',
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        assert "error" not in r.text and "Error" not in r.text


# ---------------------------------------------------------------------- 6: forged request ids
@pytest.mark.parametrize("rid", ["a\nINFO forged line", "a\rb", "a\x1b[31mred", "a\u202eb", "x" * 300])
def test_request_id_with_control_characters_is_refused(http, rid):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "request_id": rid})
    assert_error(r, 400)
    assert "forged" not in r.text


def test_request_id_header_is_checked_and_kept(http):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                  headers={"X-Request-Id": "bad\x7fid"})
    assert_error(r, 400, "X-Request-Id")
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                  headers={"X-Request-Id": "client-42"})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-client-42"
    assert r.headers["x-request-id"] == "client-42"


# ---------------------------------------------------------------------- 7: log lines, bodies, lists
@pytest.mark.anyio
async def test_request_log_lines_are_bounded(tokenizer, caplog):
    app = make_app(tokenizer, "--enable-log-requests", "--max-log-len", "50")
    stops = [f"stop-string-{i:04d}-" + "s" * 40 for i in range(100)]
    with caplog.at_level(logging.DEBUG, logger="lmserve.server"):
        async with asgi_client(app) as c:
            r = await c.post("/v1/completions", json={"prompt": "long " * 30 + "\nINFO forged", "max_tokens": 2,
                                                      "stop": stops, "unknown_field_" + "k" * 5000: 1})
            assert r.status_code == 200, r.text
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "lmserve.server"]
    assert any("Received request" in line for line in lines)
    assert any("details: prompt" in line for line in lines)
    for line in lines:
        assert len(line) < 50 * 3 + 300 and "\n" not in line, line[:200]


@pytest.mark.anyio
async def test_requests_are_not_logged_by_default(tokenizer, caplog):
    app = make_app(tokenizer)
    with caplog.at_level(logging.DEBUG, logger="lmserve.server"):
        async with asgi_client(app) as c:
            assert (await c.post("/v1/completions", json={"prompt": "secret", "max_tokens": 2})).status_code == 200
    assert not [r for r in caplog.records if "secret" in r.getMessage()]


@pytest.mark.anyio
async def test_too_many_stop_strings_is_a_400(tokenizer):
    app = make_app(tokenizer)
    async with asgi_client(app) as c:
        for field in ("stop", "bad_words"):
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: ["x"] * 100_000})
            assert_error(r, 400, "--max-stop-strings")["param"] == field
        r = await c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, "stop": ["x"] * 129})
        assert_error(r, 400, "at most 128")
        assert (await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                      "stop": ["x"] * 128})).status_code == 200
        for field in ("stop", "bad_words"):  # long entries cost every step of the engine
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: ["y" * 20000] * 4})
            assert_error(r, 400, "characters in all")


@pytest.mark.anyio
async def test_body_size_is_limited(tokenizer):
    app = make_app(tokenizer, "--max-request-body-bytes", "1000000")
    big = b'{"prompt": "' + b"a" * 2_000_000 + b'", "max_tokens": 2}'
    async with asgi_client(app) as c:
        assert_error(await c.post("/v1/completions", content=big,
                                  headers={"Content-Type": "application/json"}), 413, "--max-request-body-bytes")

        async def chunked():
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]

        assert_error(await c.post("/v1/completions", content=chunked(),
                                  headers={"Content-Type": "application/json"}), 413)
        assert (await c.post("/v1/completions", json={"prompt": "a" * 900_000, "max_tokens": 2})).status_code == 400
        headers = {f"x-h{i}": "v" for i in range(300)}
        assert_error(await c.get("/v1/models", headers=headers), 431)
        assert (await c.get("/v1/models")).status_code == 200


def test_too_many_prompts_is_refused_before_tokenizing(http):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": ["a"] * 3000, "n": 2, "max_tokens": 1})
    assert_error(r, 400, "sequences")
    assert http.get("/load").json()["server_load"] == 0


def test_body_size_default_is_16_mib(http):
    r = http.post("/v1/completions", content=b'{"prompt": "' + b"a" * (17 << 20) + b'"}',
                  headers={"Content-Type": "application/json"})
    assert_error(r, 413)


# ---------------------------------------------------------------------- offline siblings
def test_offline_chat_and_lone_surrogates(tiny_model_dir):
    from lmserve import LLM, SamplingParams

    llm = LLM(tiny_model_dir, dtype="float32", kv_cache_memory=16 * 2**20)
    out = llm.chat(MSG, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="surrogate"):
        llm.generate(["\ud800x"], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="surrogate"):
        SamplingParams(stop=["\udfff"])
    with pytest.raises(ValueError, match="finite"):
        SamplingParams(length_penalty=float("nan"))
    assert SamplingParams(allowed_token_ids=[3, 1] * 100_000, stop_token_ids=[2] * 1000).allowed_token_ids == [3, 1]


@pytest.mark.anyio
async def test_async_engine_keeps_caller_ids_apart(tiny_model_dir):
    """The root of finding 3: two live requests under one caller id, one aborted."""
    from lmserve.engine.arg_utils import EngineArgs
    from lmserve.engine.async_engine import AsyncLLM
    from lmserve.sampling_params import RequestOutputKind, SamplingParams

    engine = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model_dir, dtype="float32",
                                                  kv_cache_memory=16 * 2**20))
    try:
        params = SamplingParams(max_tokens=16, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)

        async def run() -> list:
            return [o async for o in engine.generate({"prompt_token_ids": [5, 6, 7]}, params, "same")]

        async def aborted() -> None:
            async for _ in engine.generate({"prompt_token_ids": [5, 6, 7]}, params.clone(), "same"):
                pass

        victim = asyncio.ensure_future(aborted())
        outs = await asyncio.gather(run(), run())
        victim.cancel()
        for o in outs:
            assert o[-1].request_id == "same" and len(o[-1].outputs[0].token_ids) == 16
        await asyncio.sleep(0.2)
        assert engine.get_stats()["num_running"] == 0 and engine._num_live == 0  # noqa: SLF001
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- headers and CORS
def test_header_bytes_are_limited(tiny_server, http):
    try:  # the server answers 400 and closes while the client may still be sending
        r = httpx.get(tiny_server.url + "/v1/models", headers={"x-big": "a" * 300_000}, timeout=10)
        assert r.status_code in (400, 431)
    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
        pass
    assert httpx.get(tiny_server.url + "/health", timeout=10).status_code == 200


@pytest.mark.anyio
async def test_cors_is_vllm_compatible_by_default_and_can_be_locked(tokenizer):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    async with asgi_client(make_app(tokenizer)) as c:
        r = await c.options("/v1/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    locked = make_app(tokenizer, "--allowed-origins", '["https://app.example"]', "--allowed-methods", '["POST"]',
                      "--allowed-headers", '["Authorization","Content-Type"]')
    async with asgi_client(locked) as c:
        r = await c.options("/v1/completions", headers=preflight)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = await c.options("/v1/completions", headers={**preflight, "Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
