"""HTTP behaviour that needs an engine in a given state: still loading, overloaded, dead,
failing mid-stream; plus --root-path and --middleware. In-process, no model."""

from __future__ import annotations

import json

import httpx
import pytest

from lmserve.entrypoints.cli import make_parser
from lmserve.entrypoints.cli_args import parse_serve_args
from lmserve.entrypoints.openai.app import build_app
from tests.server.fake_engine import FakeAsyncLLM
from tests.server.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_app(tokenizer, argv=(), mode="ok", engine=True):
    _, serve = make_parser()
    args = parse_serve_args(list(argv), serve)
    fake = FakeAsyncLLM(tokenizer, mode=mode) if engine else None
    return build_app(args, fake), fake


async def call(app, method, path, root_path="", **kw):
    """``root_path`` as uvicorn --root-path sets it: the ASGI path then starts with it."""
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.request(method, root_path + path, **kw)


BODY = {"prompt": "hello", "max_tokens": 5}


@pytest.mark.anyio
async def test_not_ready_is_503(tokenizer):
    app, _ = make_app(tokenizer, engine=False)
    r = await call(app, "GET", "/health")
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    r = await call(app, "POST", "/v1/completions", json=BODY)
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    assert (await call(app, "GET", "/metrics")).status_code == 200
    app.state.server.set_engine(FakeAsyncLLM(tokenizer))
    assert (await call(app, "GET", "/health")).status_code == 200
    r = await call(app, "POST", "/v1/completions", json=BODY)
    assert r.status_code == 200 and r.json()["model"] == "fake"


@pytest.mark.anyio
async def test_overloaded_is_503_before_streaming(tokenizer):
    app, _ = make_app(tokenizer, mode="overloaded")
    for stream in (False, True):
        r = await call(app, "POST", "/v1/completions", json={**BODY, "stream": stream})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "ServiceUnavailableError"


@pytest.mark.anyio
async def test_dead_engine(tokenizer):
    app, _ = make_app(tokenizer, mode="dead")
    r = await call(app, "GET", "/health")
    assert r.status_code == 503 and r.json()["error"]["type"] == "EngineDeadError"
    assert (await call(app, "GET", "/ping")).status_code == 503


@pytest.mark.anyio
async def test_error_mid_stream_is_an_event_then_done(tokenizer):
    app, fake = make_app(tokenizer, mode="die-mid-stream")
    r = await call(app, "POST", "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True})
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "EngineDeadError" and err["code"] == 503
    r = await call(app, "POST", "/v1/completions", json=BODY)
    assert r.status_code == 503 and "died" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_no_api_key_means_open_access(tokenizer, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv("LMSERVE_API_KEY", raising=False)
    app, _ = make_app(tokenizer)
    assert (await call(app, "GET", "/v1/models")).status_code == 200


@pytest.mark.anyio
async def test_api_key_from_env(tokenizer, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "envkey")
    app, _ = make_app(tokenizer)
    assert (await call(app, "GET", "/v1/models")).status_code == 401
    ok = await call(app, "GET", "/v1/models", headers={"Authorization": "Bearer envkey"})
    assert ok.status_code == 200


@pytest.mark.anyio
async def test_root_path_and_middleware(tokenizer):
    app, _ = make_app(tokenizer, ["--middleware", "tests.server.test_fake_engine.AddHeader",
                                  "--middleware", "tests.server.test_fake_engine.add_header_fn",
                                  "--disable-fastapi-docs", "--served-model-name", "a", "b", "--api-key", "k"])
    auth = {"Authorization": "Bearer k"}
    r = await call(app, "GET", "/v1/models", root_path="/api", headers=auth)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["a", "b"]
    assert r.headers["x-class-middleware"] == "1" and r.headers["x-fn-middleware"] == "1"
    assert (await call(app, "GET", "/health", root_path="/api")).status_code == 200  # no key needed
    assert (await call(app, "GET", "/v1/models", root_path="/api")).status_code == 401
    assert (await call(app, "GET", "/openapi.json", headers=auth)).status_code == 404


@pytest.mark.anyio
async def test_cors_configured_origins(tokenizer):
    app, _ = make_app(tokenizer, ["--allowed-origins", '["http://good"]', "--allow-credentials"])
    good = await call(app, "GET", "/health", headers={"Origin": "http://good"})
    assert good.headers["access-control-allow-origin"] == "http://good"
    assert good.headers["access-control-allow-credentials"] == "true"
    bad = await call(app, "GET", "/health", headers={"Origin": "http://evil"})
    assert "access-control-allow-origin" not in bad.headers


class AddHeader:
    """An ASGI middleware class, as --middleware accepts."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send2(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"x-class-middleware", b"1")]}
            await send(message)
        await self.app(scope, receive, send2)


async def add_header_fn(request, call_next):
    """An http middleware function, as --middleware accepts."""
    response = await call_next(request)
    response.headers["x-fn-middleware"] = "1"
    return response


def _usage_chunks(text: str) -> list[dict]:
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    return [e for e in events if e.get("usage")]


@pytest.mark.anyio
async def test_force_include_usage_ends_every_stream_with_usage(tokenizer):
    """--enable-force-include-usage: streams without stream_options get the final usage chunk
    (completions and chat); without the flag they do not; continuous stats stay opt-in."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    for argv, expected in (((), 0), (("--enable-force-include-usage",), 1)):
        app, _ = make_app(tokenizer, argv)
        for path, body in (("/v1/completions", {**BODY, "stream": True}), ("/v1/chat/completions", chat)):
            r = await call(app, "POST", path, json=body)
            assert r.status_code == 200, r.text
            usage = _usage_chunks(r.text)
            assert len(usage) == expected, (argv, path, r.text)
            if expected:
                assert usage[0]["choices"] == [] and usage[0]["usage"]["completion_tokens"] > 0
    app, _ = make_app(tokenizer, ["--enable-force-include-usage"])
    r = await call(app, "POST", "/v1/completions",
                   json={**BODY, "stream": True, "stream_options": {"include_usage": False,
                                                                     "continuous_usage_stats": True}})
    assert len(_usage_chunks(r.text)) > 1  # forced, and continuous because the request asked
