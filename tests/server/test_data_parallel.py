"""``lmserve serve --data-parallel-size 2``: two engine replica processes behind one API server,
checked with the official openai client. The reference is the same tiny fp32 model run offline in
this process (one engine): greedy outputs must be equal token for token."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.slow  # a DP=2 server start-up spawns two engines (~10-20 s on 2 busy cores)

DP_ARGS = ["--served-model-name", "tiny", "-dp", "2", "--dtype", "float32", "--kv-cache-memory", "16MiB",
           "--max-num-seqs", "16", "--enable-sleep-mode", "--disable-log-requests"]
LORA_PROMPT_IDS = [5, 17, 42, 99, 3, 250, 7]
PROMPTS = [f"Hello number {i}: the quick brown fox jumps over the lazy dog. Paris is" for i in range(6)]


def replica_processes(server: ServerProcess) -> list[psutil.Process]:
    """The server's replica processes (spawned children; not multiprocessing's resource tracker)."""
    return [p for p in psutil.Process(server.proc.pid).children()
            if "spawn_main" in " ".join(p.cmdline())]


def engine_series(text: str, name: str) -> dict[str, float]:
    """engine label -> value of ``name``'s samples in a Prometheus exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and 'engine="' in line:
            out[line.split('engine="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[int]]:
    """A LoRA adapter of the tiny model (allowed directory, adapter "mlp") and PEFT's greedy tokens."""
    from tests.lora_utils import ADAPTER_SPECS, greedy, make_peft_adapter
    allowed = tmp_path_factory.mktemp("dp-lora")
    merged = make_peft_adapter(tiny_model_dir, str(allowed / "mlp"), 3, **ADAPTER_SPECS["mlp"])
    return str(allowed), greedy(merged, [LORA_PROMPT_IDS], 8)[0]


@pytest.fixture(scope="module")
def dp_server(tiny_model_dir: str, lora_dir: tuple[str, list[int]],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = str(tmp_path_factory.mktemp("logs") / "dp-server.log")
    server = ServerProcess([tiny_model_dir, *DP_ARGS, "--enable-lora", "--max-lora-rank", "16",
                            "--lora-allowed-dirs", lora_dir[0],
                            "--logits-processor-pattern", r"tests\.logitsprocs_examples\."], log,
                           env={"VLLM_SERVER_DEV_MODE": "1", "LMSERVE_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dp_client(dp_server: ServerProcess):
    from openai import OpenAI
    with OpenAI(base_url=dp_server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_model_dir: str) -> dict[str, str]:
    """Greedy completions of PROMPTS (and of PROMPTS[0] with a stop string) from one offline engine."""
    from lmserve.entrypoints.llm import LLM
    from lmserve.sampling_params import SamplingParams
    llm = LLM(tiny_model_dir, dtype="float32", kv_cache_memory="16MiB")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    ref = {p: o.outputs[0].text for p, o in zip(PROMPTS, outs)}
    stop = ref[PROMPTS[0]][3:6]
    stopped = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    ref["stop"], ref["stop_text"] = stop, stopped[0].outputs[0].text
    return ref


def test_greedy_equals_one_engine_and_both_replicas_serve(dp_server: ServerProcess, dp_client,
                                                           reference: dict[str, str]) -> None:
    def complete(prompt: str) -> str:
        r = dp_client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(complete, PROMPTS))
    assert texts == [reference[p] for p in PROMPTS]
    # n > 1 with a stop string: every choice equals the one-engine greedy text cut at the stop string
    r = dp_client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, n=2,
                                     stop=[reference["stop"]])
    assert [c.text for c in r.choices] == [reference["stop_text"]] * 2
    # two requests in flight at once (each stream held open past its first chunk): the router counts
    # the first in flight on its replica, so the second goes to the other (a burst spreads)
    first = dp_client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=64, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(first))
    second = dp_client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=64, temperature=0,
                                          stream=True, extra_body={"ignore_eos": True})
    next(iter(second))
    for stream in (first, second):
        for _ in stream:
            pass
    metrics = httpx.get(dp_server.url + "/metrics").text
    queries = engine_series(metrics, "vllm:prefix_cache_queries_total")
    assert set(queries) == {"0", "1"}
    assert queries["0"] > 0 and queries["1"] > 0, queries  # concurrent requests landed on both replicas


def test_streaming_abort_frees_the_replica(dp_server: ServerProcess, dp_client) -> None:
    stream = dp_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=300, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
    chunks = 0
    for chunk in stream:
        chunks += 1
        if chunks == 3:
            break
    stream.close()  # the client goes away mid-stream: the replica must abort the request
    deadline = time.time() + 30
    while True:
        metrics = httpx.get(dp_server.url + "/metrics").text
        running = engine_series(metrics, "vllm:num_requests_running")
        waiting = engine_series(metrics, "vllm:num_requests_waiting")
        if sum(running.values()) + sum(waiting.values()) == 0:
            break
        assert time.time() < deadline, (running, waiting)
        time.sleep(0.2)
    # the server still serves afterwards
    r = dp_client.completions.create(model="tiny", prompt="Paris is", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_validation_stays_in_the_front(dp_client) -> None:
    import openai
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        dp_client.completions.create(model="tiny", prompt=[7] * 600, max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        dp_client.completions.create(model="tiny", prompt="hi", max_tokens=5, temperature=-1)


def test_request_params_must_pickle(dp_client) -> None:
    import openai
    spec = {"qualname": "tests.logitsprocs_examples.ForceTokenProcessor", "args": [65]}
    r = dp_client.completions.create(model="tiny", prompt="Paris is", max_tokens=4, temperature=0,
                                     extra_body={"logits_processors": [spec], "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == [65] * 4  # an importable processor crosses to a replica
    closure = {"qualname": "tests.logitsprocs_examples.force_token_closure", "args": [65]}
    with pytest.raises(openai.BadRequestError, match="data-parallel engine replica.*pickle"):
        dp_client.completions.create(model="tiny", prompt="Paris is", max_tokens=4,
                                     extra_body={"logits_processors": [closure]})


def test_dev_routes_reach_every_replica(dp_server: ServerProcess, dp_client) -> None:
    url = dp_server.url
    assert httpx.post(url + "/reset_prefix_cache").json() == {"success": True}
    assert httpx.post(url + "/sleep", params={"level": 1}).json()["status"] == "sleeping"
    assert httpx.get(url + "/is_sleeping").json() == {"is_sleeping": True}
    assert httpx.post(url + "/wake_up").json()["status"] == "awake"
    assert httpx.get(url + "/is_sleeping").json() == {"is_sleeping": False}
    r = dp_client.completions.create(model="tiny", prompt="Paris is", max_tokens=2, temperature=0)
    assert len(r.choices[0].text) > 0


def test_lora_adapter_on_every_replica(dp_server: ServerProcess, dp_client, lora_dir) -> None:
    import openai
    allowed, expected = lora_dir
    url = dp_server.url
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "mlp", "lora_path": f"{allowed}/mlp"})
    assert r.status_code == 200, r.text
    # equal loads: consecutive requests alternate between the replicas (the prompt is under one block,
    # so it has no cache affinity)
    for _ in range(2):
        out = dp_client.completions.create(model="mlp", prompt=LORA_PROMPT_IDS, max_tokens=8, temperature=0,
                                           extra_body={"return_token_ids": True, "ignore_eos": True})
        assert out.choices[0].model_extra["token_ids"] == expected
    metrics = httpx.get(url + "/metrics").text
    assert all(v > 0 for v in engine_series(metrics, "vllm:prefix_cache_queries_total").values())
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "mlp"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        dp_client.completions.create(model="mlp", prompt=LORA_PROMPT_IDS, max_tokens=2)


def test_embeddings_equal_one_engine(tiny_model_dir: str, tmp_path) -> None:
    from openai import OpenAI

    from lmserve.entrypoints.llm import LLM
    texts = ["hello world", "Paris is the capital of France.", "one two three", "The quick brown fox"]
    server = ServerProcess([tiny_model_dir, "--served-model-name", "tiny-embed", "--runner", "pooling", "-dp", "2",
                            "--dtype", "float32", "--disable-log-requests"], str(tmp_path / "dp-embed.log"))
    try:
        server.wait_ready()
        with OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            got = [d.embedding for d in client.embeddings.create(model="tiny-embed", input=texts).data]
        queries = engine_series(httpx.get(server.url + "/metrics").text, "vllm:num_requests_running")
        assert set(queries) == {"0", "1"}
        replicas = replica_processes(server)
        assert len(replicas) == 2
    finally:
        server.stop()  # SIGTERM: the server stops its replicas
    _, alive = psutil.wait_procs(replicas, timeout=10)
    assert not alive
    want = [o.outputs.embedding for o in LLM(tiny_model_dir, runner="pooling", dtype="float32").embed(texts)]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)


def test_killed_replica_fails_the_stream_and_stops_the_server(tiny_model_dir: str, tmp_path) -> None:
    import openai
    server = ServerProcess([tiny_model_dir, *DP_ARGS], str(tmp_path / "dp-kill.log"))
    try:
        server.wait_ready()
        replicas = replica_processes(server)
        assert len(replicas) == 2
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=400, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            with pytest.raises(openai.APIError, match="engine died"):
                for i, _ in enumerate(stream):
                    if i == 2:
                        os.kill(replicas[0].pid, signal.SIGKILL)
        try:  # dead before the error reached the client: /health says so until the server stops listening
            assert httpx.get(server.url + "/health", timeout=5).status_code == 503
        except httpx.TransportError:
            pass
        assert server.proc.wait(timeout=30) != 0, server.log()
        _, alive = psutil.wait_procs(replicas, timeout=10)
        assert not alive  # no orphaned replica
    finally:
        server.stop()
