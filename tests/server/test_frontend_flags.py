"""vLLM's front-end and logging flags on a real ``lmserve serve``: a Unix socket, the access log
filter, --log-level and --log-error-stack."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.conftest import REPO_ROOT


def _serve_on_socket(model_dir: str, sock: str, log_path: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmserve.entrypoints.cli", "serve", model_dir, "--uds", sock,
           "--kv-cache-memory", "16MiB", "--dtype", "float32", *extra]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait(client: httpx.Client, proc: subprocess.Popen, log_path: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, open(log_path).read()
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(open(log_path).read())


@pytest.mark.slow
def test_unix_socket_access_log_filter_and_error_stacks(tiny_model_dir: str, tmp_path) -> None:
    sock, log_path = str(tmp_path / "lmserve.sock"), str(tmp_path / "server.log")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }} {% endfor %}[{{ house_word }}]")
    proc = _serve_on_socket(tiny_model_dir, sock, log_path, "--disable-access-log-for-endpoints", "/health,/ping",
                            "--log-level", "debug", "--log-error-stack", "--enable-log-requests",
                            "--enable-log-outputs", "--chat-template", str(template),
                            "--default-chat-template-kwargs", '{"house_word": "zebra"}')
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://lmserve", timeout=60) as c:
            _wait(c, proc, log_path)
            c.get("/ping")
            out = c.post("/v1/completions", json={"model": tiny_model_dir, "prompt": "Hi", "max_tokens": 2})
            assert out.status_code == 200, out.text
            for kwargs, word in (({}, "zebra"), ({"chat_template_kwargs": {"house_word": "okapi"}}, "okapi")):
                tok = c.post("/tokenize", json={"model": tiny_model_dir, "return_token_strs": True,
                                                "messages": [{"role": "user", "content": "Hi"}], **kwargs})
                assert tok.status_code == 200, tok.text
                assert word in "".join(tok.json()["token_strs"]).replace("\u2581", "")
            stream = c.post("/v1/completions", json={"model": tiny_model_dir, "prompt": "Hi", "max_tokens": 3,
                                                     "stream": True, "ignore_eos": True})
            assert stream.status_code == 200
            bad = c.post("/v1/completions", json={"model": tiny_model_dir, "prompt": "Hi", "max_tokens": -1})
            assert bad.status_code == 400
        time.sleep(0.5)
        log = open(log_path).read()
        assert "\"POST /v1/completions HTTP/1.1\" 200" in log  # the access log is on ...
        assert "\"GET /health HTTP" not in log and "\"GET /ping HTTP" not in log  # ... but not for these paths
        assert "Error response to POST /v1/completions" in log and "Traceback" in log  # --log-error-stack
        assert "Generated response" in log and "finish_reason: length" in log  # --enable-log-outputs
        assert "(streaming delta)" in log and "(streaming complete)" in log  # --enable-log-deltas (default)
        assert " DEBUG " in log or "DEBUG" in log.split("Error response")[0]  # --log-level debug
    finally:
        proc.terminate()
        proc.wait(timeout=30)
