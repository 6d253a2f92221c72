"""End to end with the real SmolLM2-135M-Instruct at temperature 1.0: 200 JSON samples against a
schema with nested objects, arrays, enums and required fields all parse and validate; regex and
choice always obey; the same through the legacy ``guided_*`` fields and offline ``LLM``."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.slow

NAME = "SmolLM2-135M-Instruct"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
}
PROMPT = "Here is a person described as JSON:"
REGEX = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
CHOICES = ["Paris", "London", "Berlin", "Madrid"]


@pytest.fixture(scope="module")
def smol(smollm2_path, tmp_path_factory):
    server = ServerProcess(["--kv-cache-memory", "512MiB", "--disable-log-requests",
                            "--max-num-batched-tokens", "1024"],
                           str(tmp_path_factory.mktemp("logs") / "smollm2-so.log"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _validate_all(texts: list[str]) -> None:
    for t in texts:
        jsonschema.validate(json.loads(t), SCHEMA)


def test_json_schema_200_samples_validate(smol):
    from openai import AsyncOpenAI

    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}

    async def main():
        async with AsyncOpenAI(base_url=smol.url + "/v1", api_key="x", max_retries=0, timeout=300) as c:
            calls = [c.completions.create(model=NAME, prompt=PROMPT, n=50, temperature=1.0, max_tokens=160, seed=i,
                                          extra_body={"response_format": rf,
                                                      "structured_outputs": {"disable_any_whitespace": True}})
                     for i in range(4)]
            return await asyncio.gather(*calls)

    outs = asyncio.run(main())
    texts = [ch.text for out in outs for ch in out.choices]
    assert len(texts) == 200
    assert all(ch.finish_reason == "stop" for out in outs for ch in out.choices)
    _validate_all(texts)
    assert len(set(texts)) > 20  # temperature 1.0 really sampled


def test_regex_choice_and_legacy_fields(smol):
    from openai import OpenAI

    with OpenAI(base_url=smol.url + "/v1", api_key="x", max_retries=0, timeout=300) as c:
        msg = [{"role": "user", "content": "Name a capital city."}]
        for body in ({"structured_outputs": {"choice": CHOICES}}, {"guided_choice": CHOICES}):
            out = c.chat.completions.create(model=NAME, messages=msg, n=16, temperature=1.0, max_tokens=8,
                                            extra_body=body)
            assert all(ch.message.content in CHOICES for ch in out.choices)
        for body in ({"structured_outputs": {"regex": REGEX}}, {"guided_regex": REGEX}):
            out = c.completions.create(model=NAME, prompt="Name and age:", n=16, temperature=1.0, max_tokens=16,
                                       extra_body=body)
            assert all(re.fullmatch(REGEX, ch.text) for ch in out.choices), [ch.text for ch in out.choices]
        out = c.completions.create(model=NAME, prompt=PROMPT, n=16, temperature=1.0, max_tokens=160,
                                   extra_body={"guided_json": SCHEMA,
                                               "guided_decoding_backend": "xgrammar:disable-any-whitespace"})
        _validate_all([ch.text for ch in out.choices])


def test_offline_llm(smollm2_path):
    from lmserve import LLM, SamplingParams
    from lmserve.sampling_params import StructuredOutputsParams

    llm = LLM(smollm2_path, kv_cache_memory=256 * 2**20)
    params = SamplingParams(n=16, temperature=1.0, max_tokens=160, seed=0,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    _validate_all([o.text for o in llm.generate([PROMPT], params)[0].outputs])
    params = SamplingParams(n=8, temperature=1.0, max_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=CHOICES))
    out = llm.chat([{"role": "user", "content": "Name a capital city."}], params)
    assert all(o.text in CHOICES for o in out[0].outputs)
