"""Fixtures for the server tests: a tiny random Llama checkpoint (made once per session)
and real ``lmserve serve`` subprocesses on free ports, waited for through /health."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server.tiny_model import write_tiny_llama

API_KEY = "test-key-123"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOGITS_PROCESSOR = "tests.logitsprocs_examples:DummyLogitsProcessor"
TINY_NAMES = ("tiny", "tiny-alias")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``lmserve serve`` subprocess. ``url`` is the root (no /v1)."""

    def __init__(self, args: list[str], log_path: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "lmserve.entrypoints.cli", "serve", *args, "--host", "127.0.0.1",
               "--port", str(self.port), "--uvicorn-log-level", "warning"]
        self._log = open(log_path, "w")
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmserve serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"lmserve serve did not become ready:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny model behind auth, with request-id headers, prompt token details, request chat
    templates (trusted, so they render in the sandbox processes) and a custom logits processor
    (seed 000's ``target_token`` example) on."""
    log = str(tmp_path_factory.mktemp("logs") / "tiny-server.log")
    server = ServerProcess([tiny_model_dir, "--served-model-name", *TINY_NAMES, "--api-key", API_KEY,
                            "--enable-request-id-headers", "--enable-prompt-tokens-details",
                            "--kv-cache-memory", "32MiB", "--max-num-seqs", "64", "--dtype", "float32",
                            "--trust-request-chat-template", "--logits-processors", LOGITS_PROCESSOR], log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def client(tiny_server: ServerProcess):
    from openai import OpenAI

    with OpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def async_client(tiny_server: ServerProcess):
    """An AsyncOpenAI client living in the test's own event loop (tests marked anyio)."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def http(tiny_server: ServerProcess) -> Iterator[httpx.Client]:
    """Raw HTTP with the API key set."""
    with httpx.Client(base_url=tiny_server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as c:
        yield c


def metric_value(text: str, name: str) -> float:
    """The value of the first sample of ``name`` in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# ---------------------------------------------------------------------- pooling servers
@pytest.fixture(scope="session")
def minilm_server(minilm_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """all-MiniLM-L6-v2 served as an embedding model (the runner is detected from BertModel)."""
    log = str(tmp_path_factory.mktemp("logs") / "minilm-server.log")
    server = ServerProcess([minilm_path, "--served-model-name", "minilm", "--disable-log-requests"], log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def minilm_http(minilm_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=minilm_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def minilm_client(minilm_server: ServerProcess):
    from openai import OpenAI

    with OpenAI(base_url=minilm_server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def cross_encoder_server(make_cross_encoder_checkpoint, tmp_path_factory: pytest.TempPathFactory
                         ) -> Iterator[ServerProcess]:
    """A one-label cross-encoder (MiniLM encoder + seeded random head) with ``--task score``."""
    log = str(tmp_path_factory.mktemp("logs") / "cross-encoder-server.log")
    server = ServerProcess([make_cross_encoder_checkpoint(1), "--served-model-name", "ce", "--task", "score",
                            "--disable-log-requests"], log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def classifier_server(make_cross_encoder_checkpoint, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[ServerProcess]:
    """A three-label sequence classifier (MiniLM encoder + seeded random head)."""
    log = str(tmp_path_factory.mktemp("logs") / "classifier-server.log")
    server = ServerProcess([make_cross_encoder_checkpoint(3), "--served-model-name", "clf",
                            "--disable-log-requests"], log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_embed_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny ChatML Llama used as an embedding model (``--runner pooling``): it has a chat
    template, so the ``messages`` form of /v1/embeddings can be checked."""
    log = str(tmp_path_factory.mktemp("logs") / "tiny-embed-server.log")
    server = ServerProcess([tiny_model_dir, "--served-model-name", "tiny-embed", "--runner", "pooling",
                            "--dtype", "float32", "--disable-log-requests"], log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------- extra API routes
API_STORE_ENTRIES = 4


@pytest.fixture(scope="session")
def api_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny model with the dev routes (VLLM_SERVER_DEV_MODE=1), sleep mode, /tokenizer_info
    and a response store of API_STORE_ENTRIES entries."""
    log = str(tmp_path_factory.mktemp("logs") / "api-server.log")
    server = ServerProcess([tiny_model_dir, "--served-model-name", "tiny", "--api-key", API_KEY,
                            "--kv-cache-memory", "16MiB", "--max-num-seqs", "16", "--dtype", "float32",
                            "--enable-sleep-mode", "--enable-tokenizer-info-endpoint",
                            "--responses-store-max-entries", str(API_STORE_ENTRIES)], log,
                           env={"VLLM_SERVER_DEV_MODE": "1"})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
