"""LoRA adapters over HTTP with the official openai client: /v1/models lists adapters with their
parent and root, a request picks its adapter by ``model`` (unknown names are 404s), and adapters
load and unload at run time (from --lora-allowed-dirs only) while a stream runs on one of them."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.lora_utils import ADAPTER_SPECS, greedy, make_peft_adapter
from tests.server.conftest import ServerProcess

PROMPT_IDS = [5, 17, 42, 99, 3, 250, 7]


@pytest.fixture(scope="module")
def lora_setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-srv")
    allowed = root / "allowed"
    outside = root / "outside"
    allowed.mkdir()
    outside.mkdir()
    refs = {}
    for seed, name in enumerate(ADAPTER_SPECS, start=1):
        merged = make_peft_adapter(tiny_model_dir, str(allowed / name), seed, **ADAPTER_SPECS[name])
        refs[name] = greedy(merged, [PROMPT_IDS], 8)[0]
    make_peft_adapter(tiny_model_dir, str(outside / "evil"), 9, **ADAPTER_SPECS["all"])
    os.symlink(outside / "evil", allowed / "link-out")
    return allowed, outside, refs


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir, lora_setup, tmp_path_factory) -> Iterator[ServerProcess]:
    allowed, _, _ = lora_setup
    log = str(tmp_path_factory.mktemp("logs") / "lora-server.log")
    server = ServerProcess([tiny_model_dir, "--served-model-name", "tiny", "--dtype", "float32",
                            "--kv-cache-memory", "32MiB", "--enable-lora", "--max-loras", "2",
                            "--max-lora-rank", "16", "--max-cpu-loras", "4",
                            "--lora-modules", f"all={allowed / 'all'}",
                            f'{{"name": "mlp", "path": "{allowed / "mlp"}", "base_model_name": "tiny"}}',
                            "--lora-allowed-dirs", str(allowed)], log,
                           env={"LMSERVE_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def oai(lora_server):
    from openai import OpenAI

    with OpenAI(base_url=lora_server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def complete_ids(oai, model: str, max_tokens: int = 8) -> list[int]:
    r = oai.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=max_tokens, temperature=0,
                               extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.model == model
    return r.choices[0].token_ids


def test_models_list_adapters_with_parent_and_root(oai, lora_setup):
    allowed, _, _ = lora_setup
    cards = {m.id: m for m in oai.models.list().data}
    assert set(cards) == {"tiny", "all", "mlp"}
    assert cards["all"].parent == "tiny" and cards["all"].root == os.path.realpath(allowed / "all")
    assert cards["mlp"].parent == "tiny"
    assert oai.models.retrieve("all").id == "all"


def test_request_picks_adapter_by_model(oai, lora_setup):
    _, _, refs = lora_setup
    base = complete_ids(oai, "tiny")
    assert complete_ids(oai, "all") == refs["all"] != base  # PEFT's merged model, token for token
    assert complete_ids(oai, "mlp") == refs["mlp"]
    chat = oai.chat.completions.create(model="mlp", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    assert chat.model == "mlp"
    import openai
    with pytest.raises(openai.NotFoundError) as e:
        complete_ids(oai, "no-such-adapter")
    assert "no-such-adapter" in str(e.value)


def test_load_and_unload_while_streaming(oai, lora_server, lora_setup):
    allowed, outside, refs = lora_setup
    url = lora_server.url
    expected = complete_ids(oai, "all", max_tokens=400)
    stream = oai.completions.create(model="all", prompt=PROMPT_IDS, max_tokens=400, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = iter(stream)
    got = list(next(chunks).choices[0].token_ids)
    # while the stream runs: unload its adapter, load another, in another thread of requests
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "all"}, timeout=30)
    assert r.status_code == 200 and "removed" in r.text
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "qv", "lora_path": str(allowed / "qv-rslora")},
                   timeout=30)
    assert r.status_code == 200 and "added" in r.text, r.text
    for c in chunks:
        got += c.choices[0].token_ids
    assert got == expected  # the running request kept its adapter's weights
    import openai
    with pytest.raises(openai.NotFoundError):
        complete_ids(oai, "all")
    assert complete_ids(oai, "qv") == refs["qv-rslora"]
    # errors, as vLLM's
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "all"}).status_code == 404
    dup = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "qv", "lora_path": str(allowed / "mlp")})
    assert dup.status_code == 400 and "already been loaded" in dup.json()["error"]["message"]
    for path in (str(allowed / ".." / "outside" / "evil"), str(allowed / "link-out"), str(outside / "evil")):
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
        assert r.status_code == 400 and "--lora-allowed-dirs" in r.json()["error"]["message"], path
    assert "evil" not in {m.id for m in oai.models.list().data}
    # reload the unloaded name in place of nothing, concurrently with requests on the base model
    results = []
    t = threading.Thread(target=lambda: results.append(complete_ids(oai, "tiny")))
    t.start()
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "all", "lora_path": str(allowed / "all")})
    t.join()
    assert r.status_code == 200 and complete_ids(oai, "all") == refs["all"]


def test_runtime_routes_absent_without_the_env(monkeypatch):
    from fastapi.testclient import TestClient

    from lmserve.entrypoints.cli_args import add_server_args, make_serve_parser
    from lmserve.entrypoints.openai.app import build_app

    for k in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "LMSERVE_ALLOW_RUNTIME_LORA_UPDATING"):
        monkeypatch.delenv(k, raising=False)
    args = add_server_args(make_serve_parser()).parse_args([])
    with TestClient(build_app(args)) as c:
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"}).status_code == 404
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    with TestClient(build_app(args)) as c:  # present (the engine is not ready yet: 503)
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"}).status_code == 503
