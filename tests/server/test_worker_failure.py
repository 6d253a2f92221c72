"""Issue 24: a pipeline-parallel server (``-pp 2``, mp backend) whose worker process is killed
mid-stream: the streaming ``openai`` client gets an error, the server exits within seconds with
status 1 (no hang); and a server killed outright leaves no worker process behind."""

from __future__ import annotations

import os
import signal
import time

import openai
import pytest

from tests.server.conftest import ServerProcess


def _worker_pids(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` and that run the mp worker entry point."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"lmserve.executor.mp_worker" in cmd:
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(tiny_model_dir: str, tmp_path) -> ServerProcess:
    server = ServerProcess([tiny_model_dir, "--dtype", "float32", "--kv-cache-memory", "16MiB",
                            "--pipeline-parallel-size", "2", "--logits-processors",
                            "tests.server.test_shutdown:SlowLogitsProcessor"], str(tmp_path / "server.log"))
    server.wait_ready()
    return server


@pytest.mark.slow
def test_killed_worker_ends_the_stream_with_an_error_and_the_server_exits(tiny_model_dir: str, tmp_path) -> None:
    server = _start(tiny_model_dir, tmp_path)
    try:
        workers = _worker_pids(server.proc.pid)
        assert len(workers) == 1, server.log()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model=tiny_model_dir, prompt="Hello", max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
        received = 0
        with pytest.raises(openai.APIError):
            for _ in stream:
                received += 1
                if received == 3:
                    os.kill(workers[0], signal.SIGKILL)
        assert 3 <= received < 400
        killed_at = time.monotonic()
        assert server.proc.wait(timeout=30) == 1, server.log()
        assert time.monotonic() - killed_at < 30
        assert "worker rank 1" in server.log() and "was killed by signal 9" in server.log()
    finally:
        server.stop()


@pytest.mark.slow
def test_workers_exit_when_the_server_process_is_killed(tiny_model_dir: str, tmp_path) -> None:
    server = _start(tiny_model_dir, tmp_path)
    try:
        workers = _worker_pids(server.proc.pid)
        assert len(workers) == 1, server.log()
        server.proc.kill()
        server.proc.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers)
    finally:
        server.stop()
