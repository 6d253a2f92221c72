"""Finding 8 of issue 23: SIGTERM drains for at most --shutdown-timeout seconds, then ends the
rest with an error event; a second signal exits at once. Real server processes on the tiny
model, slowed by a logits processor that sleeps at every step."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
import torch

from lmserve.logits_processor import BatchUpdate, LogitsProcessor, VllmConfig
from lmserve.sampling_params import SamplingParams
from tests.server.conftest import ServerProcess

STEP_SLEEP_S = 0.02


class SlowLogitsProcessor(LogitsProcessor):
    """Sleeps ``STEP_SLEEP_S`` at every step, so a 400-token stream takes about 8 s."""

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        return None

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        return None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        time.sleep(STEP_SLEEP_S)
        return logits


def start(tiny_model_dir: str, tmp_path, *flags: str) -> ServerProcess:
    server = ServerProcess([tiny_model_dir, "--dtype", "float32", "--kv-cache-memory", "16MiB", "--logits-processors",
                            "tests.server.test_shutdown:SlowLogitsProcessor", *flags], str(tmp_path / "server.log"))
    server.wait_ready()
    return server


class Stream(threading.Thread):
    """One streamed completion read in the background: its events, and when it started and ended."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events: list[dict | str] = []
        self.started = threading.Event()
        self.ended_at: float | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        body = {"prompt": "Hello", "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.started.set()
        except httpx.HTTPError as e:
            self.error = e
        self.ended_at = time.monotonic()
        self.started.set()

    def finish_reason(self) -> str | None:
        reasons = [c.get("finish_reason") for e in self.events if isinstance(e, dict) for c in e.get("choices", [])]
        return next((r for r in reasons if r), None)

    def error_message(self) -> str | None:
        return next((e["error"]["message"] for e in self.events if isinstance(e, dict) and "error" in e), None)


@pytest.mark.slow
def test_sigterm_drains_then_ends_the_rest_with_an_error_event(tiny_model_dir, tmp_path):
    server = start(tiny_model_dir, tmp_path, "--shutdown-timeout", "2")
    try:
        short, long = Stream(server.url, 30), Stream(server.url, 450)
        for s in (short, long):
            s.start()
            assert s.started.wait(30)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=20)
        exited = time.monotonic() - sent
        short.join(5)
        long.join(5)
        assert short.finish_reason() == "length" and short.events[-1] == "[DONE]", short.events[-3:]
        assert long.finish_reason() is None and "--shutdown-timeout" in (long.error_message() or ""), long.events[-3:]
        assert long.events[-1] == "[DONE]"
        assert 1.5 < long.ended_at - sent < 5, long.ended_at - sent
        assert exited < 8, exited
        assert server.proc.returncode in (0, -signal.SIGTERM)
    finally:
        server.stop()


@pytest.mark.slow
def test_default_shutdown_ends_streams_at_once_and_a_second_signal_exits(tiny_model_dir, tmp_path):
    server = start(tiny_model_dir, tmp_path)  # --shutdown-timeout 0, as vLLM
    try:
        stream = Stream(server.url, 450)
        stream.start()
        assert stream.started.wait(30)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=20)
        stream.join(5)
        assert "shutting down" in (stream.error_message() or ""), stream.events[-3:]
        assert stream.ended_at - sent < 3 and time.monotonic() - sent < 8
    finally:
        server.stop()

    server = start(tiny_model_dir, tmp_path, "--shutdown-timeout", "60")
    try:
        stream = Stream(server.url, 450)
        stream.start()
        assert stream.started.wait(30)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None  # draining: the stream still runs
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=10)
        assert time.monotonic() - sent < 4
        stream.join(5)
        assert stream.ended_at is not None and stream.finish_reason() is None
    finally:
        server.stop()
