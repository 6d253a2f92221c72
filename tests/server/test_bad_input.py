"""Malformed and hostile requests: each gets the right status and an OpenAI error body,
and the server keeps serving afterwards."""

from __future__ import annotations

import time

import pytest

C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def comp(**kw):
    return {"model": "tiny", "prompt": "hi", "max_tokens": 2, **kw}


def chat(**kw):
    return {"model": "tiny", "messages": MSG, "max_tokens": 2, **kw}


# (id, path, json body or raw bytes, expected status, expected param or None, substring of the message)
CASES = [
    ("invalid-json", C, b'{"prompt": "hi",', 400, None, "Invalid JSON"),
    ("invalid-utf8", C, b'{"prompt": "\xff\xfe", "max_tokens": 2}', 400, None, "Invalid JSON"),
    ("empty-body", C, b"", 400, None, "required"),
    ("array-body", C, [1, 2], 400, None, "JSON object"),
    ("deeply-nested", C, b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None, ""),
    ("missing-prompt", C, {"model": "tiny"}, 400, "prompt", "prompt"),
    ("prompt-int", C, comp(prompt=123), 400, "prompt", "prompt"),
    ("prompt-empty-list", C, comp(prompt=[]), 400, "prompt", "empty"),
    ("prompt-empty-ids", C, comp(prompt=[[]]), 400, "prompt", "empty"),
    ("prompt-mixed", C, comp(prompt=["a", 1]), 400, "prompt", "prompt"),
    ("prompt-empty-string", C, comp(prompt=""), 400, "prompt", "empty"),
    ("token-out-of-vocab", C, comp(prompt=[999999]), 400, "prompt", "out of vocabulary"),
    ("token-negative", C, comp(prompt=[-1]), 400, "prompt", "out of vocabulary"),
    ("max-tokens-negative", C, comp(max_tokens=-5), 400, "max_tokens", "greater than or equal to 1"),
    ("max-tokens-zero", C, comp(max_tokens=0), 400, "max_tokens", ""),
    ("max-tokens-string", C, comp(max_tokens="abc"), 400, "max_tokens", "integer"),
    ("max-tokens-huge", C, comp(max_tokens=10**30), 400, "max_tokens", ""),
    ("n-zero", C, comp(n=0), 400, "n", ""),
    ("n-huge", C, comp(n=100000), 400, "n", ""),
    ("temperature-negative", C, comp(temperature=-1), 400, "temperature", ""),
    ("temperature-too-high", C, comp(temperature=3), 400, "temperature", ""),
    ("temperature-string", C, comp(temperature="hot"), 400, "temperature", ""),
    ("temperature-nan", C, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature", ""),
    ("top-p-too-high", C, comp(top_p=1.5), 400, "top_p", ""),
    ("top-p-zero", C, comp(top_p=0), 400, "top_p", ""),
    ("top-k-bad", C, comp(top_k=-2), 400, "top_k", ""),
    ("presence-penalty", C, comp(presence_penalty=5), 400, "presence_penalty", ""),
    ("seed-overflow", C, comp(seed=2**70), 400, "seed", ""),
    ("unknown-model", C, comp(model="gpt-17"), 404, "model", "does not exist"),
    ("chat-unknown-model", CH, chat(model="gpt-17"), 404, "model", "does not exist"),
    ("logprobs-over-max", C, comp(logprobs=21), 400, "logprobs", "max allowed"),
    ("top-logprobs-over-20", CH, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", ""),
    ("top-logprobs-without-logprobs", CH, chat(top_logprobs=2), 400, "top_logprobs", "logprobs"),
    ("prompt-logprobs-over-max", C, comp(prompt_logprobs=50), 400, "prompt_logprobs", "max allowed"),
    ("prompt-logprobs-stream", C, comp(prompt_logprobs=1, stream=True), 400, "prompt_logprobs", ""),
    ("priority-under-fcfs", C, comp(priority=1), 400, "priority", "priority"),
    ("logit-bias-bad-key", C, comp(logit_bias={"abc": 1}), 400, "logit_bias", "token ids"),
    ("logit-bias-bad-value", C, comp(logit_bias={"5": 1000}), 400, "logit_bias", "[-100, 100]"),
    ("logit-bias-out-of-vocab", C, comp(logit_bias={"99999999": 1}), 400, "logit_bias", "out-of-vocab"),
    ("ten-mb-prompt", C, comp(prompt="a" * 10_000_000), 400, "prompt", "maximum context length"),
    ("prompt-too-long", C, comp(prompt="hello world " * 400), 400, None, "maximum context length is 512"),
    ("prompt-plus-max-tokens", C, comp(prompt="hello", max_tokens=600), 400, "max_tokens",
     "However, you requested"),
    ("stop-empty", C, comp(stop=""), 400, "stop", "empty"),
    ("stream-options-without-stream", C, comp(stream_options={"include_usage": True}), 400, "stream_options", ""),
    ("min-tokens-over-max", C, comp(min_tokens=5, max_tokens=2), 400, "min_tokens", ""),
    ("allowed-token-ids-empty", C, comp(allowed_token_ids=[]), 400, "allowed_token_ids", ""),
    ("allowed-token-ids-out-of-vocab", C, comp(allowed_token_ids=[10**7]), 400, "allowed_token_ids", ""),
    ("stop-token-ids-negative", C, comp(stop_token_ids=[-1]), 400, "stop_token_ids", ""),
    ("truncate-zero", C, comp(truncate_prompt_tokens=0), 400, "truncate_prompt_tokens", ""),
    ("truncate-over-context", C, comp(truncate_prompt_tokens=10000), 400, "truncate_prompt_tokens", ""),
    ("suffix", C, comp(suffix="x"), 400, "suffix", "not currently supported"),
    ("best-of-not-n", C, comp(best_of=3), 400, "best_of", ""),
    ("response-format-schema-missing", C, comp(response_format={"type": "json_schema"}), 400,
     "response_format.json_schema", "must be provided"),
    ("response-format-unknown-type", C, comp(response_format={"type": "xml"}), 400, "response_format.type", ""),
    ("structured-outputs-two", CH, chat(structured_outputs={"choice": ["a"], "regex": "a"}), 400,
     "structured_outputs", "exactly one"),
    ("structured-outputs-unknown-key", CH, chat(structured_outputs={"choices": ["a"]}), 400, "structured_outputs",
     "unknown key"),
    ("structured-outputs-beam", C, comp(structured_outputs={"regex": "a"}, use_beam_search=True), 400,
     "use_beam_search", "beam"),
    ("guided-backend-outlines", C, comp(guided_regex="a", guided_decoding_backend="outlines"), 400,
     "guided_decoding_backend", "xgrammar"),
    ("repetition-detection-bad", C, comp(repetition_detection={"max_pattern_size": 1, "min_pattern_size": 2}),
     400, "repetition_detection", ""),
    ("vllm-xargs-nested", C, comp(vllm_xargs={"a": {"b": 1}}), 400, "vllm_xargs.a", ""),
    ("request-id-too-long", C, comp(request_id="x" * 10000), 400, "request_id", ""),
    ("messages-empty", CH, chat(messages=[]), 400, "messages", ""),
    ("messages-string", CH, chat(messages="hi"), 400, "messages", ""),
    ("message-without-role", CH, chat(messages=[{"content": "hi"}]), 400, "messages.0.role", ""),
    ("message-content-number", CH, chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content", ""),
    ("image-content", CH, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400, "messages", "not supported"),
    ("tool-choice-auto", CH, chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto"),
     400, "tool_choice", "not supported yet"),
    ("continue-and-generation-prompt", CH, chat(continue_final_message=True), 400, "continue_final_message", ""),
    ("template-syntax-error", CH, chat(chat_template="{% for %}"), 400, "messages", ""),
    ("template-raises", CH, chat(chat_template="{{ raise_exception('nope') }}"), 400, "messages", "nope"),
    ("chat-max-tokens-negative", CH, chat(max_completion_tokens=-1), 400, "max_completion_tokens", ""),
    ("chat-n-zero", CH, chat(n=0), 400, "n", ""),
    ("tokenize-nothing", "/tokenize", {"model": "tiny"}, 400, "prompt", ""),
    ("detokenize-bad-type", "/detokenize", {"tokens": "abc"}, 400, "tokens", ""),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(http, case):
    _, path, body, status, param, fragment = case
    t0 = time.time()
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert time.time() - t0 < 10, "a bad request must be refused quickly"
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    if param is not None:
        assert err["param"] == param, err
    assert fragment in err["message"], err


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_server_still_serves_after_the_table(http, client):
    for case in CASES[:12]:  # run a slice again back to back, then ask something sensible
        body = case[2]
        http.post(case[1], content=body if isinstance(body, bytes) else None,
                  json=None if isinstance(body, bytes) else body)
    assert http.get("/health").status_code == 200
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
    assert c.choices[0].finish_reason in ("length", "stop")
