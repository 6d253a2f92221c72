"""Structured outputs over HTTP with the official ``openai`` client, on a tiny random Llama
sampled at temperature 1 (a random model obeys only if the constraint is applied):
response_format, ``structured_outputs`` and the legacy ``guided_*`` fields on both endpoints,
and bad constraints answered with 400 while the server keeps serving."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.server.conftest import ServerProcess

MODEL = "tiny"
SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "n": {"enum": [1, 2, 3]},
                                           "ok": {"type": "boolean"}},
          "required": ["kind", "n", "ok"], "additionalProperties": False}
MSG = [{"role": "user", "content": "Describe a pet."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    s = ServerProcess([tiny_model_dir, "--served-model-name", MODEL, "--kv-cache-memory", "32MiB", "--dtype",
                       "float32", "--structured-outputs-config.backend", "xgrammar",
                       "--structured-outputs-config.disable_any_whitespace", "true",
                       "--logits-processor-pattern", r"tests\.logitsprocs_examples\."],
                      str(tmp_path_factory.mktemp("logs") / "so-server.log"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def chat(client, **kw):
    kw.setdefault("temperature", 1.0)
    kw.setdefault("max_tokens", 40)
    return client.chat.completions.create(model=MODEL, messages=MSG, **kw)


def complete(client, **kw):
    kw.setdefault("temperature", 1.0)
    kw.setdefault("max_tokens", 40)
    return client.completions.create(model=MODEL, prompt="Once upon a time", **kw)


def test_response_format_json_schema(client):
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    out = chat(client, n=8, response_format=rf, seed=1)
    for c in out.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        assert " " not in c.message.content  # the server's disable_any_whitespace
    out = complete(client, n=4, extra_body={"response_format": rf})
    for c in out.choices:
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_response_format_json_object_streams(client):
    stream = chat(client, response_format={"type": "json_object"}, stream=True, max_tokens=12)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.startswith("{"), text


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_structured_outputs_and_legacy_fields(client, endpoint):
    call = chat if endpoint == "chat" else complete

    def texts(out):
        return [c.message.content if endpoint == "chat" else c.text for c in out.choices]

    for body in ({"structured_outputs": {"choice": ["red", "green", "blue"]}},
                 {"guided_choice": ["red", "green", "blue"]}):
        assert set(texts(call(client, n=6, extra_body=body))) <= {"red", "green", "blue"}
    for body in ({"structured_outputs": {"regex": r"[a-c]{2}-[0-9]{3}"}}, {"guided_regex": r"[a-c]{2}-[0-9]{3}"},
                 {"guided_regex": r"[a-c]{2}-[0-9]{3}", "guided_decoding_backend": "xgrammar"}):
        assert all(re.fullmatch(r"[a-c]{2}-[0-9]{3}", t) for t in texts(call(client, n=4, extra_body=body)))
    for body in ({"guided_json": SCHEMA}, {"structured_outputs": {"json": json.dumps(SCHEMA)}}):
        for t in texts(call(client, n=3, extra_body=body)):
            jsonschema.validate(json.loads(t), SCHEMA)
    out = texts(call(client, n=3, extra_body={"guided_grammar": 'root ::= "x" [0-9] [0-9]'}))
    assert all(re.fullmatch(r"x[0-9]{2}", t) for t in out)


def test_structural_tag_response_format(client):
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "fixed answer"}}
    out = chat(client, n=2, extra_body={"response_format": tag})
    assert [c.message.content for c in out.choices] == ["fixed answer"] * 2


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "structured_outputs.json", "invalid JSON schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "invalid regular expression"),
    ({"guided_grammar": "root ::= missing_rule"}, "structured_outputs.grammar", "invalid grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
    ({"guided_json": {"type": "string"}, "structured_outputs": {"regex": "a"}}, "structured_outputs", "not both"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format", "use one"),
    ({"structured_outputs": {"json": {"type": "string"}, "whitespace_pattern": " *"}},
     "structured_outputs.whitespace_pattern", "disable_any_whitespace"),
])
def test_bad_constraints_are_400_and_server_keeps_serving(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, extra_body=body)
    err = e.value.body
    assert err["param"] == param and words in err["message"], err
    assert chat(client, max_tokens=3).choices[0].message.content is not None


def test_per_request_logits_processors(client):
    proc = {"qualname": "tests.logitsprocs_examples.ForceTokenProcessor", "args": [65], "kwargs": {"after": 1}}
    out = complete(client, max_tokens=4, logprobs=0,
                   extra_body={"logits_processors": [proc], "return_tokens_as_token_ids": True, "ignore_eos": True})
    assert out.choices[0].logprobs.tokens[1:] == ["token_id:65"] * 3
    for bad, words in ((["os.system"], "not allowed"),
                       ([{"qualname": "tests.logitsprocs_examples.ForceTokenProcessor"}], "could not be constructed"),
                       ([{"qualname": "tests.logitsprocs_examples.ForceTokenProcessor", "bogus": 1}], "bogus")):
        with pytest.raises(openai.BadRequestError) as e:
            complete(client, extra_body={"logits_processors": bad})
        assert words in str(e.value.body), e.value.body
