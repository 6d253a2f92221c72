"""Every route of a real ``lmserve serve`` process, plus auth, X-Request-Id and CORS."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, TINY_NAMES, metric_value


def test_health_ping_version_load_without_key(tiny_server):
    for method, path in [("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")]:
        r = httpx.request(method, tiny_server.url + path)
        assert r.status_code == 200, (path, r.text)
    r = httpx.get(tiny_server.url + "/metrics")
    assert r.status_code == 200
    assert "vllm:num_requests_running" in r.text


def test_other_routes_need_the_key(tiny_server):
    for method, path in [("GET", "/v1/models"), ("GET", "/version"), ("GET", "/load"),
                         ("POST", "/v1/completions"), ("POST", "/tokenize"), ("GET", "/docs")]:
        r = httpx.request(method, tiny_server.url + path, json={})
        assert r.status_code == 401, path
        err = r.json()["error"]
        assert err["type"] == "AuthenticationError" and err["code"] == 401
    r = httpx.get(tiny_server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    bad = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_version_and_load(http):
    assert isinstance(http.get("/version").json()["version"], str)
    assert http.get("/load").json() == {"server_load": 0}


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == list(TINY_NAMES)
    card = client.models.retrieve("tiny-alias")
    assert card.id == "tiny-alias" and card.object == "model"
    assert models.data[0].model_extra["max_model_len"] == 512
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_both_served_names_work_and_the_first_is_reported(client):
    for name in TINY_NAMES:
        c = client.completions.create(model=name, prompt="Hello", max_tokens=2)
        assert c.model == TINY_NAMES[0]


def test_tokenize_detokenize(http):
    r = http.post("/tokenize", json={"model": "tiny", "prompt": "Hello world", "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200, body
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    assert len(body["token_strs"]) == body["count"]
    d = http.post("/detokenize", json={"model": "tiny", "tokens": body["tokens"]}).json()
    assert d["prompt"] == "Hello world"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    text = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_gen = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}],
                                          "add_generation_prompt": False}).json()
    assert no_gen["count"] < chat["count"]
    r = http.post("/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_request_id_header_echoed(client, http):
    c = client.completions.with_raw_response.create(model="tiny", prompt="Hi", max_tokens=2,
                                                    extra_headers={"X-Request-Id": "completion-test"})
    assert c.headers["x-request-id"] == "completion-test"
    assert c.parse().id == "cmpl-completion-test"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2, extra_headers={"x-request-id": "sentiment-00001"})
    assert chat._request_id == "sentiment-00001"
    assert chat.id == "chatcmpl-sentiment-00001"
    # Without a client id the server makes one, and the body id agrees with the header.
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert r.json()["id"] == "cmpl-" + r.headers["x-request-id"]
    assert http.get("/v1/models").headers.get("x-request-id")


def test_cors(tiny_server):
    r = httpx.get(tiny_server.url + "/health", headers={"Origin": "http://example.com"})
    assert r.headers["access-control-allow-origin"] == "*"
    pre = httpx.options(tiny_server.url + "/v1/chat/completions",
                        headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
                                 "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200
    assert "POST" in pre.headers["access-control-allow-methods"]


def test_unknown_route_is_an_openai_error(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "NotFoundError"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_docs_are_served(http):
    assert http.get("/openapi.json").status_code == 200


def test_metrics_names_and_labels(http, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=3)
    text = http.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 'vllm:request_success_total{finished_reason="length",model_name="tiny"}'):
        assert name in text, name
    assert 'model_name="tiny"' in text
    assert metric_value(text, "vllm:generation_tokens_total") >= 3
    assert metric_value(text, "vllm:prefix_cache_queries_total") > 0
    assert API_KEY not in text
