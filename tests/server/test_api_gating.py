"""Which extra routes exist under which flags (in-process, scripted engine): /tokenizer_info
only with --enable-tokenizer-info-endpoint, the dev routes only with VLLM_SERVER_DEV_MODE=1,
/sleep only with --enable-sleep-mode, background responses only with a response store."""

from __future__ import annotations

import httpx
import pytest

from tests.server.scripted_app import scripted_app
from tests.server.tiny_model import build_tokenizer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


async def call(app, method, path, **kw):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.request(method, path, **kw)


async def test_routes_off_by_default(tokenizer, monkeypatch):
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    app, _ = scripted_app(tokenizer, "x")
    for method, path in (("GET", "/tokenizer_info"), ("POST", "/sleep"), ("GET", "/is_sleeping"),
                         ("POST", "/reset_prefix_cache"), ("GET", "/server_info")):
        assert (await call(app, method, path)).status_code == 404, path


async def test_sleep_needs_the_flag(tokenizer, monkeypatch):
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    app, _ = scripted_app(tokenizer, "x")
    r = await call(app, "POST", "/sleep")
    assert r.status_code == 400 and "--enable-sleep-mode" in r.json()["error"]["message"]
    assert (await call(app, "GET", "/is_sleeping")).json() == {"is_sleeping": False}


async def test_store_off(tokenizer):
    app, _ = scripted_app(tokenizer, "hello", ["--responses-store-max-entries", "0"])
    r = await call(app, "POST", "/v1/responses", json={"input": "x", "background": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "background"
    r = await call(app, "POST", "/v1/responses", json={"input": "x"})
    assert r.status_code == 200 and r.json()["store"] is False
    assert (await call(app, "GET", f"/v1/responses/{r.json()['id']}")).status_code == 404
