"""Bad requests to the pooling APIs (and pooling requests to a generative model, generation
requests to a pooling model): each gets the right status and an OpenAI error body, quickly,
and the servers keep serving afterwards."""

from __future__ import annotations

import time

import httpx
import pytest

E, P, S, R, C = "/v1/embeddings", "/pooling", "/score", "/rerank", "/classify"
Q = "What is the capital of France?"
LONG = "lorem ipsum dolor sit amet " * 200  # ~1000 tokens: over MiniLM's 256
MSG = [{"role": "user", "content": "hi"}]


def emb(**kw):
    return {"model": "minilm", "input": "hello", **kw}


# (id, path, json body or raw bytes, status, param (None: not checked), substring of the message)
MINILM_CASES = [
    ("invalid-json", E, b'{"input": "hi",', 400, None, "Invalid JSON"),
    ("empty-body", E, b"", 400, None, "required"),
    ("array-body", E, [1, 2], 400, None, "JSON object"),
    ("missing-input", E, {"model": "minilm"}, 400, "input", "input"),
    ("input-empty-list", E, emb(input=[]), 400, "input", "empty list"),
    ("input-int", E, emb(input=123), 400, "input", "input must be"),
    ("input-bool", E, emb(input=True), 400, "input", "input must be"),
    ("input-dict", E, emb(input={"text": "hi"}), 400, "input", "input must be"),
    ("input-null", E, emb(input=None), 400, "input", "input must be"),
    ("input-mixed", E, emb(input=["a", 1]), 400, "input", "not a mix"),
    ("input-floats", E, emb(input=[1.5, 2.5]), 400, "input", ""),
    ("input-empty-ids", E, emb(input=[[]]), 400, "input", "empty"),
    ("input-nested-strings", E, emb(input=[["a"]]), 400, "input", "integers"),
    ("token-out-of-vocab", E, emb(input=[999999]), 400, "input", "out of vocabulary"),
    ("token-negative", E, emb(input=[[5, -1]]), 400, "input", "out of vocabulary"),
    ("too-long", E, emb(input=LONG), 400, "input", "maximum context length is 256 tokens"),
    ("too-long-one-of-many", E, emb(input=["fine", LONG]), 400, "input", "maximum context length"),
    ("too-long-ids", E, emb(input=list(range(1000, 1300))), 400, "input", "maximum context length"),
    ("ten-mb-input", E, emb(input="a" * 10_000_000), 400, "input", "maximum context length"),
    ("encoding-format", E, emb(encoding_format="int8"), 400, "encoding_format", ""),
    ("dimensions-not-matryoshka", E, emb(dimensions=128), 400, "dimensions", "matryoshka"),
    ("dimensions-zero", E, emb(dimensions=0), 400, "dimensions", ""),
    ("dimensions-string", E, emb(dimensions="big"), 400, "dimensions", ""),
    ("normalize-string", E, emb(normalize="maybe"), 400, "normalize", ""),
    ("truncate-zero", E, emb(truncate_prompt_tokens=0), 400, "truncate_prompt_tokens", ""),
    ("truncate-minus-two", E, emb(truncate_prompt_tokens=-2), 400, "truncate_prompt_tokens", ""),
    ("truncate-over-context", E, emb(truncate_prompt_tokens=10000), 400, "truncate_prompt_tokens",
     "greater than max_model_len"),
    ("priority-under-fcfs", E, emb(priority=1), 400, "priority", "priority"),
    ("unknown-model", E, emb(model="gpt-17"), 404, "model", "does not exist"),
    ("messages-without-chat-template", E, {"messages": MSG}, 400, "messages", "chat template"),
    ("messages-empty", E, {"messages": []}, 400, "messages", ""),
    ("messages-no-role", E, {"messages": [{"content": "hi"}]}, 400, "messages.0.role", ""),
    ("messages-both-flags", E, {"messages": MSG, "add_generation_prompt": True, "continue_final_message": True},
     400, "continue_final_message", "Cannot set both"),
    ("pooling-unsupported-task", P, {"input": "x", "task": "classify"}, 400, "task", "does not support"),
    ("pooling-unknown-task", P, {"input": "x", "task": "dance"}, 400, "task", ""),
    ("pooling-activation-on-embed", P, {"input": "x", "task": "embed", "use_activation": True}, 400,
     "use_activation", "does not apply"),
    ("pooling-empty-input", P, {"input": []}, 400, "input", "empty list"),
    ("score-shapes", S, {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, 400, "text_2", "1:1, 1:N or N:N"),
    ("score-empty-text-1", S, {"text_1": [], "text_2": "a"}, 400, "text_1", "At least one"),
    ("score-empty-text-2", S, {"text_1": "a", "text_2": []}, 400, "text_2", "At least one"),
    ("score-int", S, {"text_1": 5, "text_2": "a"}, 400, "text_1", "string"),
    ("score-missing-text-2", "/v1/score", {"text_1": "a"}, 400, "text_2", ""),
    ("score-too-long", S, {"text_1": Q, "text_2": [LONG]}, 400, "text_2", "maximum context length"),
    ("rerank-no-documents", R, {"query": Q, "documents": []}, 400, "documents", "at least one document"),
    ("rerank-v2-no-documents", "/v2/rerank", {"query": Q, "documents": []}, 400, "documents", "at least one"),
    ("rerank-documents-missing", "/v1/rerank", {"query": Q}, 400, "documents", ""),
    ("rerank-documents-string", R, {"query": Q, "documents": "Paris"}, 400, "documents", ""),
    ("rerank-document-int", R, {"query": Q, "documents": [1]}, 400, None, ""),
    ("rerank-query-missing", R, {"documents": ["a"]}, 400, "query", ""),
    ("rerank-query-list", R, {"query": ["a"], "documents": ["a"]}, 400, "query", ""),
    ("rerank-too-long", R, {"query": Q, "documents": ["ok", LONG]}, 400, "documents", "maximum context length"),
    ("completions-on-pooling-model", "/v1/completions", {"prompt": "hi"}, 400, None,
     "The model does not support Completions API"),
    ("chat-on-pooling-model", "/v1/chat/completions", {"messages": MSG}, 400, None,
     "The model does not support Chat Completions API"),
    ("classify-on-embedding-model", C, {"input": "hi"}, 400, None, "The model does not support Classification API"),
]

GENERATIVE_CASES = [  # pooling APIs on the tiny generative model
    ("embeddings-on-generative", E, {"model": "tiny", "input": "hi"}, 400, None,
     "The model does not support Embeddings API"),
    ("pooling-on-generative", P, {"input": "hi"}, 400, None, "The model does not support Pooling API"),
    ("score-on-generative", S, {"text_1": "a", "text_2": "b"}, 400, None, "The model does not support Score API"),
    ("v1-score-on-generative", "/v1/score", {"text_1": "a", "text_2": "b"}, 400, None, "Score API"),
    ("rerank-on-generative", R, {"query": "a", "documents": ["b"]}, 400, None,
     "The model does not support Rerank (Score) API"),
    ("v2-rerank-on-generative", "/v2/rerank", {"query": "a", "documents": ["b"]}, 400, None, "Rerank (Score) API"),
    ("classify-on-generative", C, {"input": "hi"}, 400, None, "The model does not support Classification API"),
]

CROSS_ENCODER_CASES = [
    ("ce-rerank-no-documents", R, {"query": Q, "documents": []}, 400, "documents", "at least one document"),
    ("ce-score-too-long", S, {"text_1": Q, "text_2": LONG * 2}, 400, "text_2", "maximum context length"),
    ("ce-score-shapes", S, {"text_1": ["a", "b"], "text_2": ["c"]}, 400, "text_2", "1:1, 1:N or N:N"),
    ("ce-score-activation-type", S, {"text_1": "a", "text_2": "b", "use_activation": "maybe"}, 400,
     "use_activation", ""),
    ("ce-embeddings", E, {"input": "hi"}, 400, None, "The model does not support Embeddings API"),
    ("ce-classify-empty-input", C, {"input": []}, 400, "input", "empty list"),
    ("ce-pooling-normalize-on-classify", P, {"input": "hi", "task": "classify", "normalize": True}, 400,
     "normalize", "does not apply"),
]


def _post(http: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"Content-Type": "application/json"})
    return http.post(path, json=body)


def _check(http: httpx.Client, case) -> None:
    _, path, body, status, param, fragment = case
    t0 = time.time()
    r = _post(http, path, body)
    assert time.time() - t0 < 10, "a bad request must be refused quickly"
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    if param is not None:
        assert err["param"] == param, err
    assert fragment in err["message"], err


@pytest.mark.parametrize("case", MINILM_CASES, ids=[c[0] for c in MINILM_CASES])
def test_bad_request_embedding_model(minilm_http, case):
    _check(minilm_http, case)


@pytest.mark.parametrize("case", GENERATIVE_CASES, ids=[c[0] for c in GENERATIVE_CASES])
def test_pooling_api_on_generative_model(http, case):
    _check(http, case)


@pytest.mark.parametrize("case", CROSS_ENCODER_CASES, ids=[c[0] for c in CROSS_ENCODER_CASES])
def test_bad_request_cross_encoder(cross_encoder_server, case):
    with httpx.Client(base_url=cross_encoder_server.url, timeout=60) as http:
        _check(http, case)


def test_openai_client_gets_400(minilm_client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        minilm_client.embeddings.create(model="minilm", input=[])
    assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        minilm_client.embeddings.create(model="minilm", input=LONG, encoding_format="float")


def test_servers_still_serve(minilm_http, http, client, cross_encoder_server):
    for case in MINILM_CASES[:20] + MINILM_CASES[-20:]:  # again, back to back
        _post(minilm_http, case[1], case[2])
    assert minilm_http.get("/health").status_code == 200
    ok = minilm_http.post(E, json={"input": ["still", "serving"]})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2
    assert minilm_http.post(R, json={"query": Q, "documents": ["Paris", "Rome"]}).status_code == 200
    for case in GENERATIVE_CASES:
        _post(http, case[1], case[2])
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=2).choices[0].text is not None
    with httpx.Client(base_url=cross_encoder_server.url, timeout=60) as ce:
        for case in CROSS_ENCODER_CASES:
            _post(ce, case[1], case[2])
        assert ce.post(S, json={"text_1": Q, "text_2": ["Paris", "Rome"]}).status_code == 200
