"""A long ``vllm serve`` command line, written as vLLM's docs write them, starts lmserve and serves."""

from __future__ import annotations

import pytest

from tests.server.conftest import ServerProcess

KEY = "sk-vllm-cli"

# 30+ flags as a vLLM 0.32 deployment passes them (the server adds --host, --port, --uvicorn-log-level).
VLLM_COMMAND_LINE = [
    "--served-model-name", "my-model", "--dtype", "float32", "--max-model-len", "512",
    "--max_num_seqs", "16", "--max-num-batched-tokens", "256", "--enable-chunked-prefill",
    "--enable-prefix-caching", "--block-size", "16", "--gpu-memory-utilization", "0.85",
    "--kv-cache-memory-bytes", str(32 * 2**20), "--swap-space", "4", "--seed", "0",
    "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1", "--data-parallel-size", "1",
    "--distributed-executor-backend", "mp", "--disable-custom-all-reduce", "--enforce-eager",
    "--no-async-scheduling", "--api-server-count", "1", "--trust-remote-code", "--tokenizer-mode", "auto",
    "--load-format", "auto", "--max-logprobs", "20", "--enable-log-requests", "--max-log-len", "200",
    "--disable-uvicorn-access-log", "--enable-force-include-usage", "--enable-prompt-tokens-details",
    "--enable-request-id-headers", "--api-key", KEY, "--response-role", "assistant",
    "--chat-template-content-format", "auto", "--allowed-origins", '["*"]', "--kv-cache-dtype", "auto",
    "--compilation-config.level", "0", "--override-generation-config", '{"temperature": 0.5}',
    "--scheduling-policy", "fcfs", "--disable-fastapi-docs",
]


def test_command_line_has_thirty_flags():
    assert sum(1 for token in VLLM_COMMAND_LINE if token.startswith("--")) >= 30


@pytest.mark.slow
def test_vllm_command_line_serves(tiny_model_dir, tmp_path):
    from openai import OpenAI

    server = ServerProcess([tiny_model_dir, *VLLM_COMMAND_LINE], str(tmp_path / "server.log"))
    try:
        server.wait_ready()
        with OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as client:
            assert [m.id for m in client.models.list().data] == ["my-model"]
            reply = client.chat.completions.create(model="my-model", max_tokens=4, logprobs=True, top_logprobs=3,
                                                   messages=[{"role": "user", "content": "Hello"}])
            assert reply.usage.completion_tokens == len(reply.choices[0].logprobs.content) > 0
            chunks = list(client.completions.create(model="my-model", prompt="Hi", max_tokens=3, stream=True))
            assert chunks[-1].usage is not None  # --enable-force-include-usage
        with open(server.log_path) as f:
            log = f.read()
        assert "--swap-space" in log and "--disable-custom-all-reduce" in log  # no-ops named at start-up
        assert "num_prompt_tokens" in log  # --enable-log-requests logs each request's params
        assert "--distributed-executor-backend mp: one rank" in log
    finally:
        server.stop()
