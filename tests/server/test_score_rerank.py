"""/score, /v1/score, /rerank, /v1/rerank, /v2/rerank and /classify: the seeds' examples, each
response field checked against the seeds' shapes; scoring as cosine similarity with the
embedding model and with a cross-encoder checked against HF transformers."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch

Q = "What is the capital of France?"
DOCS = ["The capital of Brazil is Brasilia.", "The capital of France is Paris.", "Horses and cows are both animals"]
SCORE_KEYS = {"id", "object", "created", "model", "data", "usage"}  # the seed's score response


def _embed(http: httpx.Client, texts: list[str]) -> list[np.ndarray]:
    body = http.post("/v1/embeddings", json={"input": texts}).json()
    return [np.asarray(d["embedding"], dtype=np.float64) for d in body["data"]]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _count(http: httpx.Client, text: str) -> int:
    return http.post("/tokenize", json={"prompt": text}).json()["count"]


def _check_score_body(body: dict, model: str, n: int) -> list[float]:
    assert set(body) == SCORE_KEYS
    assert body["id"].startswith("score-") and body["object"] == "list" and body["model"] == model
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 60
    assert [set(d) for d in body["data"]] == [{"index", "object", "score"}] * n
    assert [d["index"] for d in body["data"]] == list(range(n))
    assert all(d["object"] == "score" for d in body["data"])
    return [d["score"] for d in body["data"]]


# ---------------------------------------------------------------------- embedding model
def test_score_seed_examples_embedding_model(minilm_http):
    e_q, *e_docs = _embed(minilm_http, [Q, *DOCS])
    q2 = "What is the capital of Brazil?"
    # single inference (the seed sends encoding_format too)
    r = minilm_http.post("/score", json={"model": "minilm", "encoding_format": "float", "text_1": Q, "text_2": DOCS[1]})
    assert r.status_code == 200, r.text
    (s,) = _check_score_body(r.json(), "minilm", 1)
    assert abs(s - _cos(e_q, e_docs[1])) < 1e-5
    n_pair = _count(minilm_http, Q) + 1 + _count(minilm_http, DOCS[1])  # both prompts and a pad token
    assert r.json()["usage"] == {"prompt_tokens": n_pair, "total_tokens": n_pair, "completion_tokens": 0}
    # 1-N
    body = minilm_http.post("/score", json={"model": "minilm", "text_1": Q, "text_2": DOCS[:2]}).json()
    scores = _check_score_body(body, "minilm", 2)
    assert scores == pytest.approx([_cos(e_q, e) for e in e_docs[:2]], abs=1e-5)
    assert scores[1] > scores[0]
    # N-N
    body = minilm_http.post("/v1/score", json={"model": "minilm", "text_1": [q2, Q], "text_2": DOCS[:2]}).json()
    scores = _check_score_body(body, "minilm", 2)
    e_q2 = _embed(minilm_http, [q2])[0]
    assert scores == pytest.approx([_cos(e_q2, e_docs[0]), _cos(e_q, e_docs[1])], abs=1e-5)


def _check_rerank_body(body: dict, model: str, docs: list[str], with_documents: bool = True) -> None:
    assert set(body) == {"id", "model", "usage", "results"}  # the seed's rerank response
    assert body["id"].startswith("rerank-") and body["model"] == model
    assert set(body["usage"]) == {"total_tokens"} and body["usage"]["total_tokens"] > 0
    keys = {"index", "document", "relevance_score"} if with_documents else {"index", "relevance_score"}
    for res in body["results"]:
        assert set(res) == keys
        if with_documents:
            assert res["document"] == {"text": docs[res["index"]]}
    scores = [res["relevance_score"] for res in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_rerank_seed_example_embedding_model(minilm_http):
    req = {"model": "minilm", "query": Q, "documents": DOCS}
    bodies = [minilm_http.post(path, json=req).json() for path in ("/rerank", "/v1/rerank", "/v2/rerank")]
    for body in bodies:
        _check_rerank_body(body, "minilm", DOCS)
        assert [r["index"] for r in body["results"]] == [1, 0, 2]  # Paris first
        assert body["results"][0]["document"] == {"text": "The capital of France is Paris."}
    assert [r["relevance_score"] for r in bodies[0]["results"]] == [r["relevance_score"] for r in bodies[2]["results"]]
    scores = minilm_http.post("/score", json={"text_1": Q, "text_2": DOCS}).json()
    by_index = {r["index"]: r["relevance_score"] for r in bodies[0]["results"]}
    assert [by_index[i] for i in range(3)] == pytest.approx([d["score"] for d in scores["data"]], abs=1e-6)
    assert bodies[0]["usage"]["total_tokens"] == scores["usage"]["total_tokens"] == \
        sum(_count(minilm_http, Q) + 1 + _count(minilm_http, d) for d in DOCS)


def test_rerank_top_n_return_documents_and_cohere_shapes(minilm_http):
    full = minilm_http.post("/rerank", json={"query": Q, "documents": DOCS}).json()["results"]
    top2 = minilm_http.post("/v1/rerank", json={"query": Q, "documents": DOCS, "top_n": 2}).json()
    _check_rerank_body(top2, "minilm", DOCS)
    assert top2["results"] == full[:2]
    for n in (0, 3, 10):
        body = minilm_http.post("/rerank", json={"query": Q, "documents": DOCS, "top_n": n}).json()
        assert len(body["results"]) == 3
    # Cohere: return_documents=false leaves the documents out; documents may be {"text": ...} objects
    bare = minilm_http.post("/v2/rerank", json={"query": Q, "documents": [{"text": d} for d in DOCS],
                                                "return_documents": False, "top_n": 1}).json()
    _check_rerank_body(bare, "minilm", DOCS, with_documents=False)
    assert bare["results"] == [{"index": 1, "relevance_score": full[0]["relevance_score"]}]
    r = minilm_http.post("/rerank", json={"query": Q, "documents": DOCS}, headers={"X-Request-Id": "abc"})
    assert r.json()["id"] == "rerank-abc"


# ---------------------------------------------------------------------- cross-encoder
@pytest.fixture(scope="module")
def hf_cross_encoder(make_cross_encoder_checkpoint):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = make_cross_encoder_checkpoint(1)
    return (AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path))


def _hf_logits(model, tok, text_1, text_2=None) -> np.ndarray:
    enc = tok(text_1, text_2, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.float().numpy()


def test_cross_encoder_score_and_rerank(cross_encoder_server, hf_cross_encoder):
    model, tok = hf_cross_encoder
    logits = _hf_logits(model, tok, [Q] * 3, DOCS)[:, 0]
    probs = 1 / (1 + np.exp(-logits))
    with httpx.Client(base_url=cross_encoder_server.url, timeout=60) as http:
        body = http.post("/score", json={"model": "ce", "text_1": Q, "text_2": DOCS}).json()
        assert np.allclose(_check_score_body(body, "ce", 3), probs, atol=1e-3)
        pair_tokens = sum(len(tok(Q, d)["input_ids"]) for d in DOCS)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == pair_tokens
        raw = http.post("/v1/score", json={"text_1": [Q, Q], "text_2": DOCS[:2], "use_activation": False}).json()
        assert np.allclose(_check_score_body(raw, "ce", 2), logits[:2], atol=5e-3, rtol=1e-3)
        rr = http.post("/rerank", json={"model": "ce", "query": Q, "documents": DOCS}).json()
        _check_rerank_body(rr, "ce", DOCS)
        assert [r["index"] for r in rr["results"]] == list(np.argsort(-probs, kind="stable"))
        assert rr["usage"]["total_tokens"] == pair_tokens
        r = http.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 400 and "does not support Embeddings API" in r.json()["error"]["message"]


def test_classify(classifier_server, make_cross_encoder_checkpoint):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = make_cross_encoder_checkpoint(3)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["I love this movie!", "This is terrible.", "The weather is fine."]
    ref = torch.tensor(_hf_logits(model, tok, texts)).softmax(-1).numpy()
    with httpx.Client(base_url=classifier_server.url, timeout=60) as http:
        r = http.post("/classify", json={"model": "clf", "input": texts})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == SCORE_KEYS
        assert body["id"].startswith("classify-") and body["object"] == "list" and body["model"] == "clf"
        assert [set(d) for d in body["data"]] == [{"index", "label", "probs", "num_classes"}] * 3
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        assert np.allclose([d["probs"] for d in body["data"]], ref, atol=1e-3)
        assert [d["num_classes"] for d in body["data"]] == [3, 3, 3]
        assert [d["label"] for d in body["data"]] == [model.config.id2label[int(i)] for i in ref.argmax(-1)]
        n = sum(len(tok(t)["input_ids"]) for t in texts)
        assert body["usage"] == {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}
        per_token = http.post("/pooling", json={"input": texts[0]}).json()["data"][0]["data"]
        assert np.asarray(per_token).shape == (len(tok(texts[0])["input_ids"]), 3)
        r = http.post("/score", json={"text_1": "a", "text_2": "b"})
        assert r.status_code == 400 and "does not support Score API" in r.json()["error"]["message"]
