"""/v1/embeddings and /pooling on all-MiniLM-L6-v2: the official openai client (float and
base64), every response field, token-id and chat inputs, truncation, batching, and agreement
with the offline ``LLM.embed``."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest
import torch

M = "minilm"
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "What is the capital of France?",
         "The capital of France is Paris.", "Les élèves étudient à l'école.", "emoji 😀🎉 in text",
         "def main():\n    return 0", "1234567890", "a", "Horses and cows are both animals"]
LONG = "lorem ipsum dolor sit amet " * 200  # ~1000 tokens: over MiniLM's 256


@pytest.fixture(scope="module")
def minilm_llm(minilm_path):
    from lmserve import LLM

    return LLM(minilm_path)  # the server's settings: the same model, dtype and max_model_len


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a, dtype=torch.float32),
                                                       torch.tensor(b, dtype=torch.float32), dim=0))


def _finished_ok(metrics_text: str) -> float:
    """vllm:request_success_total with finished_reason="stop"."""
    for line in metrics_text.splitlines():
        if line.startswith("vllm:request_success_total{") and 'finished_reason="stop"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError("vllm:request_success_total")


def _decode(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


# ---------------------------------------------------------------------- openai client
def test_openai_client_float_matches_offline(minilm_client, minilm_llm):
    r = minilm_client.embeddings.create(model=M, input=TEXTS, encoding_format="float")
    assert r.object == "list" and r.model == M and r.id.startswith("embd-")
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    assert all(d.object == "embedding" and len(d.embedding) == 384 for d in r.data)
    ref = minilm_llm.embed(TEXTS)
    for d, o in zip(r.data, ref):
        assert _cos(d.embedding, o.outputs.embedding) > 0.99999
    n = sum(len(o.prompt_token_ids) for o in ref)
    assert r.usage.prompt_tokens == r.usage.total_tokens == n


def test_openai_client_base64(minilm_client):
    floats = minilm_client.embeddings.create(model=M, input=TEXTS[:4], encoding_format="float")
    b64 = minilm_client.embeddings.create(model=M, input=TEXTS[:4], encoding_format="base64")
    for f, b in zip(floats.data, b64.data):
        assert isinstance(b.embedding, str)
        decoded = _decode(b.embedding)
        assert decoded.shape == (384,)
        assert np.array_equal(decoded, np.asarray(f.embedding, dtype=np.float32))  # bit for bit
    default = minilm_client.embeddings.create(model=M, input=TEXTS[:4])  # the client's own base64 round trip
    for f, d in zip(floats.data, default.data):
        assert np.array_equal(np.asarray(d.embedding, dtype=np.float32), np.asarray(f.embedding, dtype=np.float32))


def test_single_string_and_token_ids(minilm_client, minilm_http):
    one = minilm_client.embeddings.create(model=M, input="Hello world", encoding_format="float")
    assert len(one.data) == 1
    ids = minilm_http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    by_ids = minilm_client.embeddings.create(model=M, input=ids, encoding_format="float")
    batch_ids = minilm_client.embeddings.create(model=M, input=[ids, ids[:3]], encoding_format="float")
    assert _cos(by_ids.data[0].embedding, one.data[0].embedding) > 0.99999
    assert _cos(batch_ids.data[0].embedding, one.data[0].embedding) > 0.99999
    assert by_ids.usage.prompt_tokens == len(ids) and batch_ids.usage.prompt_tokens == len(ids) + 3


# ---------------------------------------------------------------------- wire format
def test_response_fields(minilm_http):
    t0 = time.time()
    r = minilm_http.post("/v1/embeddings", json={"model": M, "input": ["Hello world", "a"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("embd-") and body["object"] == "list" and body["model"] == M
    assert isinstance(body["created"], int) and abs(body["created"] - t0) < 60
    assert [set(d) for d in body["data"]] == [{"index", "object", "embedding"}] * 2
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    counts = [minilm_http.post("/tokenize", json={"prompt": t}).json()["count"] for t in ("Hello world", "a")]
    assert body["usage"] == {"prompt_tokens": sum(counts), "total_tokens": sum(counts), "completion_tokens": 0}
    r = minilm_http.post("/v1/embeddings", json={"input": "x"}, headers={"X-Request-Id": "my-id-1"})
    assert r.json()["id"] == "embd-my-id-1"
    models = minilm_http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [M]


def test_truncation(minilm_http, minilm_llm):
    r = minilm_http.post("/v1/embeddings", json={"input": LONG, "truncate_prompt_tokens": -1}).json()
    assert r["usage"]["prompt_tokens"] == 256
    ref = minilm_llm.embed(LONG, truncate_prompt_tokens=-1)[0].outputs.embedding
    assert _cos(r["data"][0]["embedding"], ref) > 0.99999
    r = minilm_http.post("/v1/embeddings", json={"input": [LONG, "short"], "truncate_prompt_tokens": 5}).json()
    assert r["usage"]["prompt_tokens"] == 5 + 3  # "short" is [CLS] short [SEP]
    ids = list(range(2000, 2300))
    r = minilm_http.post("/v1/embeddings", json={"input": ids, "truncate_prompt_tokens": 7}).json()
    assert r["usage"]["prompt_tokens"] == 7


def test_normalize_flag(minilm_http):
    normed = minilm_http.post("/v1/embeddings", json={"input": "Hello world"}).json()["data"][0]["embedding"]
    raw = minilm_http.post("/v1/embeddings", json={"input": "Hello world", "normalize": False}).json()
    raw = raw["data"][0]["embedding"]
    assert abs(np.linalg.norm(normed) - 1) < 1e-4 and abs(np.linalg.norm(raw) - 1) > 1e-2
    assert _cos(raw, normed) > 0.99999


def test_many_inputs_one_request(minilm_http):
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "dogs", "cars", "trees"] * 16)]
    before = _finished_ok(minilm_http.get("/metrics").text)
    batch = minilm_http.post("/v1/embeddings", json={"input": texts}).json()
    after = _finished_ok(minilm_http.get("/metrics").text)
    assert after - before == len(texts)  # one engine request per input, each counted once
    assert [d["index"] for d in batch["data"]] == list(range(len(texts)))
    for i in (0, 17, 63):
        single = minilm_http.post("/v1/embeddings", json={"input": texts[i]}).json()["data"][0]["embedding"]
        assert _cos(single, batch["data"][i]["embedding"]) > 0.99999


# ---------------------------------------------------------------------- chat messages
def test_messages_on_a_model_with_a_chat_template(tiny_embed_server):
    import httpx

    messages = [{"role": "system", "content": "You embed text."}, {"role": "user", "content": "Hello there!"}]
    with httpx.Client(base_url=tiny_embed_server.url, timeout=60) as http:
        r = http.post("/v1/embeddings", json={"model": "tiny-embed", "messages": messages})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["data"]) == 1 and body["id"].startswith("embd-")
        tok = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False,
                                           "add_special_tokens": False}).json()
        assert body["usage"]["prompt_tokens"] == tok["count"]
        by_ids = http.post("/v1/embeddings", json={"input": tok["tokens"]}).json()
        assert _cos(body["data"][0]["embedding"], by_ids["data"][0]["embedding"]) > 0.99999
        with_prompt = http.post("/v1/embeddings", json={"messages": messages, "add_generation_prompt": True}).json()
        assert with_prompt["usage"]["prompt_tokens"] > tok["count"]
        r = http.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 400 and "does not support Completions API" in r.json()["error"]["message"]


# ---------------------------------------------------------------------- /pooling
def test_pooling_endpoint(minilm_http):
    r = minilm_http.post("/pooling", json={"model": M, "input": ["Hello world", "a"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("pool-") and body["object"] == "list" and body["model"] == M
    counts = [minilm_http.post("/tokenize", json={"prompt": t}).json()["count"] for t in ("Hello world", "a")]
    data = body["data"]
    assert [(d["index"], d["object"]) for d in data] == [(0, "pooling"), (1, "pooling")]
    assert [np.asarray(d["data"]).shape for d in data] == [(counts[0], 384), (counts[1], 384)]  # per token
    assert body["usage"]["prompt_tokens"] == sum(counts)
    b64 = minilm_http.post("/pooling", json={"input": "Hello world", "encoding_format": "base64"}).json()
    decoded = _decode(b64["data"][0]["data"]).reshape(counts[0], 384)
    assert np.array_equal(decoded, np.asarray(data[0]["data"], dtype=np.float32))
    pooled = minilm_http.post("/pooling", json={"input": "Hello world", "task": "embed"}).json()["data"][0]["data"]
    emb = minilm_http.post("/v1/embeddings", json={"input": "Hello world"}).json()["data"][0]["embedding"]
    assert len(pooled) == 384 and _cos(pooled, emb) > 0.99999
