"""``lmserve run-batch``: a JSONL round trip on the tiny model (the CLI as a subprocess), and
the checks that refuse a run before the model loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.server.conftest import REPO_ROOT

ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "lmserve.entrypoints.cli", "run-batch", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                          env={**os.environ, **ENV, "PYTHONPATH": REPO_ROOT})


def _line(custom_id, url, body, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


@pytest.mark.slow
def test_round_trip(tiny_model_dir, tmp_path):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5,
            "temperature": 0}
    lines = [
        _line("chat-1", "/v1/chat/completions", chat),
        _line("cmpl-1", "/v1/completions", {"model": "tiny", "prompt": "The quick", "max_tokens": 4,
                                            "temperature": 0, "logprobs": 2}),
        "{not json",
        "",
        _line("bad-max", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -3}),
        _line("audio", "/v1/audio/transcriptions", {}),
        _line("stream", "/v1/chat/completions", {**chat, "stream": True}),
        _line("embed", "/v1/embeddings", {"model": "tiny", "input": "x"}),
        _line("chat-2", "/v1/chat/completions", chat),
        _line("get", "/v1/completions", {"prompt": "x"}, method="GET"),
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    proc = _run(["-i", str(src), "-o", str(dst), "--model", tiny_model_dir, "--served-model-name", "tiny",
                 "--kv-cache-memory", "32MiB", "--dtype", "float32"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["chat-1", "cmpl-1", None, "bad-max", "audio", "stream", "embed",
                                             "chat-2", "get"]
    for o in out:
        assert set(o) == {"id", "custom_id", "response", "error"}
        assert set(o["response"]) == {"status_code", "request_id", "body"}
    by_id = {o["custom_id"]: o for o in out}
    ok = by_id["chat-1"]
    assert ok["error"] is None and ok["response"]["status_code"] == 200
    first = ChatCompletion.model_validate(ok["response"]["body"])
    assert first.usage.completion_tokens == 5
    second = ChatCompletion.model_validate(by_id["chat-2"]["response"]["body"])
    assert second.choices[0].message.content == first.choices[0].message.content  # greedy, same prompt
    cmpl = Completion.model_validate(by_id["cmpl-1"]["response"]["body"])
    assert len(cmpl.choices[0].logprobs.tokens) == 4
    # the server's own error object, with its status
    bad = by_id["bad-max"]
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"] is None
    assert bad["error"]["error"]["param"] == "max_tokens"
    assert "does not support" in by_id["embed"]["error"]["error"]["message"]
    # lines that could not be run: a message string, as vLLM
    assert "not valid JSON" in out[2]["error"] and out[2]["response"]["status_code"] == 400
    assert "Supported endpoints" in by_id["audio"]["error"]
    assert by_id["stream"]["error"] == "Request must not be sent in stream mode"
    assert "POST" in by_id["get"]["error"]


def test_http_urls_refused(tmp_path):
    proc = _run(["-i", "https://example.com/in.jsonl", "-o", str(tmp_path / "o.jsonl"), "--model", "x"], tmp_path)
    assert proc.returncode == 2
    assert "http(s) urls are not supported" in proc.stderr and "--input-file" in proc.stderr
    src = tmp_path / "in.jsonl"
    src.write_text("")
    proc = _run(["-i", str(src), "-o", "http://host/out.jsonl", "--model", "x"], tmp_path)
    assert proc.returncode == 2 and "--output-file" in proc.stderr


def test_missing_input_and_metrics_refused(tmp_path):
    proc = _run(["-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--model", "x"], tmp_path)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    src = tmp_path / "in.jsonl"
    src.write_text("")
    proc = _run(["-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--enable-metrics"], tmp_path)
    assert proc.returncode == 2 and "--enable-metrics" in proc.stderr
