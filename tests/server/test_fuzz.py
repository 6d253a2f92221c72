"""Fuzzing (issue 23): schemathesis generates requests from the server's own OpenAPI schema for
every route (generation on the tiny model, pooling on MiniLM) and a property test puts
arbitrary text (lone surrogates, control characters, huge code points) into every text field.
The contract: no 5xx, no request left without an answer (a 60 s client timeout), and the
server still serving afterwards. Bounded: a few hundred examples in all, no shrinking."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.server.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 60
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.target],
                database=None, derandomize=True)


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny model with a short context and an 8-token cap on completions, so that whatever
    the fuzzer asks for (n=128, no max_tokens) costs at most a few seconds."""
    server = ServerProcess([tiny_model_dir, "--served-model-name", "tiny", "--api-key", API_KEY, "--dtype", "float32",
                            "--max-model-len", "64", "--kv-cache-memory", "32MiB", "--max-num-seqs", "256",
                            "--override-generation-config", '{"max_new_tokens": 8}',
                            "--trust-request-chat-template"],
                           str(tmp_path_factory.mktemp("logs") / "fuzz-server.log"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def fuzz_schema(url: str, headers: dict[str, str], examples: int, model: str) -> list[str]:
    """Runs ``examples`` generated requests per operation, schema-conforming and not; returns
    the failures. A generated ``model`` is replaced by the served one (else nearly every
    request would stop at the 404)."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=headers)
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        name = f"{op.method.upper()} {op.path}"

        @settings(FUZZ, max_examples=examples)
        @given(case=op.as_strategy() | op.as_strategy(GenerationMode.NEGATIVE))
        def run(case) -> None:
            if isinstance(getattr(case, "body", None), dict) and "model" in case.body:
                case.body["model"] = model
            body = json.dumps(getattr(case, "body", None), ensure_ascii=True, default=repr)[:300]
            try:
                response = case.call(base_url=url, headers=headers, timeout=TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - a hang or a dropped connection is a failure
                failures.append(f"{name}: {type(e).__name__} for {body}")
                return
            if response.status_code >= 500:
                failures.append(f"{name}: {response.status_code} {response.text[:200]} for {body}")

        run()
    return failures


def test_schemathesis_generation_routes(fuzz_server):
    failures = fuzz_schema(fuzz_server.url, AUTH, examples=16, model="tiny")
    assert not failures, "\n".join(failures[:20])
    with httpx.Client(base_url=fuzz_server.url, headers=AUTH, timeout=30) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert c.get("/load").json()["server_load"] == 0


def test_schemathesis_pooling_routes(minilm_server):
    failures = fuzz_schema(minilm_server.url, {}, examples=10, model="minilm")
    assert not failures, "\n".join(failures[:20])
    with httpx.Client(base_url=minilm_server.url, timeout=30) as c:
        assert c.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


# ---------------------------------------------------------------------- no text input gives a 5xx
# Arbitrary text, with the characters that broke servers before weighted in (lone surrogates,
# NUL, newlines, escapes, bidi overrides, template and format syntax).
_SPECIAL = st.sampled_from(["\ud800", "\udc00", "\udfff", "\x00", "\n", "\r\n", "\x1b[31m", "\u202e", "\ufeff",
                            "\U0010ffff", "{{ x }}", "{% for %}", "%s%n", "\\", "\"", "é", "日本", "😀", " "])
any_text = st.lists(st.one_of(_SPECIAL, st.text(st.characters(exclude_categories=()), max_size=8)),
                    max_size=6).map("".join)


def text_requests(t: str) -> list[tuple[str, dict]]:
    msgs = [{"role": "user", "content": t}]
    return [
        ("/v1/completions", {"model": "tiny", "prompt": t, "max_tokens": 2}),
        ("/v1/completions", {"model": "tiny", "prompt": ["x", t], "max_tokens": 2, "stop": [t or "s"]}),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, "bad_words": [t], "user": t,
                             "logit_bias": {t: 1}, "cache_salt": t, "vllm_xargs": {t: t}}),
        ("/v1/completions", {"model": t, "prompt": "x", "max_tokens": 2, "request_id": t}),
        ("/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 2, "stop": t or None}),
        ("/v1/chat/completions", {"messages": [{"role": t, "content": [{"type": "text", "text": t}], "name": t}],
                                  "max_tokens": 2, "chat_template_kwargs": {t: t}}),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": 2, "chat_template": t}),
        ("/tokenize", {"prompt": t, "return_token_strs": True}),
        ("/tokenize", {"messages": msgs, "chat_template": t}),
        ("/detokenize", {"tokens": [1, 2], "model": t}),
    ]


@given(t=any_text)
@settings(FUZZ, max_examples=60)
def test_no_text_input_gives_a_server_error(fuzz_server, t):
    with httpx.Client(base_url=fuzz_server.url, headers={**AUTH, "Content-Type": "application/json"},
                      timeout=TIMEOUT_S) as c:
        for path, body in text_requests(t):
            r = c.post(path, content=json.dumps(body, ensure_ascii=True))
            assert r.status_code < 500, (path, body, r.text[:300])
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        header = t.encode("latin-1", "ignore").decode("latin-1").strip()
        if header and all(32 <= ord(ch) != 127 for ch in header):
            r = c.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}', headers={"X-Request-Id": header.encode("latin-1")})
            assert r.status_code < 500


@given(t=any_text)
@settings(FUZZ, max_examples=30)
def test_no_text_input_gives_a_server_error_on_pooling(minilm_server, t):
    with httpx.Client(base_url=minilm_server.url, headers={"Content-Type": "application/json"},
                      timeout=TIMEOUT_S) as c:
        for path, body in (("/v1/embeddings", {"input": t}), ("/v1/embeddings", {"input": ["a", t], "user": t}),
                           ("/score", {"text_1": t, "text_2": [t, "b"]}),
                           ("/rerank", {"query": t, "documents": [t, "x"]}),
                           ("/classify", {"input": t}), ("/pooling", {"input": t})):
            r = c.post(path, content=json.dumps(body, ensure_ascii=True))
            assert r.status_code < 500, (path, body, r.text[:300])
    start = time.monotonic()
    assert httpx.get(minilm_server.url + "/health", timeout=10).status_code == 200
    assert time.monotonic() - start < 5
