"""Soak benchmark (issue 23): many requests at high concurrency against one ``lmserve serve``, with
random client disconnects, random invalid requests, and one SIGTERM-and-restart cycle midway.

What it checks and reports (``results.json``):
- every valid request completes (200, a finish reason, ``[DONE]`` for streams) or ends with a clean
  error (an OpenAI error body, or an SSE error event then ``[DONE]``); every invalid one is a 4xx
  with an error body; nothing else (no 5xx but 503, no dropped connection we did not drop);
- after each phase, with the server idle: ``/load`` is 0, no request running or waiting, KV cache
  usage 0 (``/metrics``);
- the server's RSS after warm-up, every 250 requests, and at the end of each server lifetime
  (growth must stay < 5 %);
- SIGTERM with requests in flight: the process exits (``--shutdown-timeout``), the restart serves.

    python benchmarks/soak.py --requests 2000 --concurrency 64 --out benchmarks/results/soak-DATE

Default model: the tests' tiny random Llama (written to a temporary directory), which keeps the
run about the server rather than the model; ``--model`` takes any model ``lmserve serve`` takes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "soak-key"
INVALID = ["surrogate", "bad_request_id", "nan_penalty", "too_many_stops", "untrusted_template", "bad_json",
           "unknown_model", "huge_body", "negative_max_tokens"]


@dataclass
class Tally:
    completed: int = 0
    clean_error: int = 0
    rejected_invalid: int = 0
    disconnected_by_client: int = 0
    unclean: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1


class Server:
    def __init__(self, model: str, port: int, log_path: str, extra: list[str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "lmserve.entrypoints.cli", "serve", model, "--host", "127.0.0.1",
                    "--port", str(port), "--api-key", API_KEY, "--uvicorn-log-level", "warning",
                    "--max-request-body-bytes", str(1 << 20), *extra]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        t = time.monotonic()
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        while time.monotonic() - t < 300:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - t
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError("server did not start")

    def rss_mib(self) -> float:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self, sig: int = signal.SIGTERM) -> tuple[float, int | None]:
        assert self.proc is not None
        t = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - t, self.proc.returncode


def invalid_request(kind: str) -> tuple[str, bytes, dict[str, str]]:
    j = {"Content-Type": "application/json"}
    body: dict[str, Any] = {"prompt": "hi", "max_tokens": 4}
    if kind == "surrogate":
        return "/v1/completions", b'{"prompt": "\\ud800 x", "max_tokens": 4}', j
    if kind == "bad_request_id":
        body["request_id"] = "x\nforged"
    elif kind == "nan_penalty":
        return "/v1/completions", b'{"prompt": "hi", "use_beam_search": true, "n": 2, "length_penalty": NaN}', j
    elif kind == "too_many_stops":
        body["stop"] = [f"s{i}" for i in range(5000)]
    elif kind == "untrusted_template":
        return "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                   "chat_template": "{% for i in range(99999) %}x{% endfor %}"}).encode(), j
    elif kind == "bad_json":
        return "/v1/completions", b'{"prompt": "hi", ', j
    elif kind == "unknown_model":
        body["model"] = "no-such-model"
    elif kind == "huge_body":
        return "/v1/completions", b'{"prompt": "' + b"a" * (3 << 19) + b'"}', j
    elif kind == "negative_max_tokens":
        body["max_tokens"] = -3
    return "/v1/completions", json.dumps(body).encode(), j


def valid_request(rng: random.Random, i: int) -> tuple[str, dict, bool, dict[str, str]]:
    stream = rng.random() < 0.5
    max_tokens = rng.randint(1, 32)
    headers = {"X-Request-Id": "shared-id"} if rng.random() < 0.05 else {}  # colliding ids are fine
    words = " ".join(rng.choice(["the", "quick", "fox", "robot", "Paris", "hello", "ünï", "日本"])
                     for _ in range(rng.randint(1, 40)))
    if rng.random() < 0.5:
        body = {"prompt": words, "max_tokens": max_tokens, "ignore_eos": rng.random() < 0.5, "stream": stream,
                "temperature": rng.choice([0, 0.7]), "seed": i}
        return "/v1/completions", body, stream, headers
    body = {"messages": [{"role": "user", "content": words}], "max_tokens": max_tokens, "stream": stream}
    return "/v1/chat/completions", body, stream, headers


async def one(client: httpx.AsyncClient, rng: random.Random, i: int, tally: Tally, long: bool = False) -> None:
    """One request of the mix (``long``: a 400-token stream, which a shutdown must cut)."""
    roll = 0.5 if long else rng.random()
    if roll < 0.15:
        kind = rng.choice(INVALID)
        tally.count("invalid:" + kind)
        path, content, headers = invalid_request(kind)
        try:
            r = await client.post(path, content=content, headers=headers)
        except httpx.HTTPError as e:
            tally.unclean.append(f"invalid {kind}: {type(e).__name__}")
            return
        if 400 <= r.status_code < 500 and "error" in r.json():
            tally.rejected_invalid += 1
        else:
            tally.unclean.append(f"invalid {kind}: {r.status_code} {r.text[:120]}")
        return
    path, body, stream, headers = valid_request(rng, i)
    if long:
        path, stream = "/v1/completions", True
        body = {"prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
    disconnect = roll > 0.90
    tally.count(("disconnect:" if disconnect else "valid:") + ("stream" if stream else "full"))
    try:
        if disconnect and not stream:
            try:
                await asyncio.wait_for(client.post(path, json=body, headers=headers), rng.uniform(0.01, 0.3))
            except asyncio.TimeoutError:
                tally.disconnected_by_client += 1
                return
            tally.completed += 1
            return
        if not stream:
            r = await client.post(path, json=body, headers=headers)
            data = r.json()
            if r.status_code == 200 and data["choices"][0]["finish_reason"]:
                tally.completed += 1
            elif r.status_code in (400, 503) and "error" in data:
                tally.clean_error += 1
            else:
                tally.unclean.append(f"{path}: {r.status_code} {r.text[:120]}")
            return
        events: list[Any] = []
        async with client.stream("POST", path, json=body, headers=headers) as r:
            if r.status_code != 200:
                data = json.loads(await r.aread())
                if r.status_code in (400, 503) and "error" in data:
                    tally.clean_error += 1
                else:
                    tally.unclean.append(f"{path} stream: {r.status_code}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
                if disconnect and len(events) >= rng.randint(1, 3):
                    tally.disconnected_by_client += 1
                    return
        if not events or events[-1] != "[DONE]":
            tally.unclean.append(f"{path} stream without [DONE]")
        elif any(isinstance(e, dict) and "error" in e for e in events):
            tally.clean_error += 1
        elif any(c.get("finish_reason") for e in events if isinstance(e, dict) for c in e.get("choices", [])):
            tally.completed += 1
        else:
            tally.unclean.append(f"{path} stream without a finish reason")
    except httpx.HTTPError as e:
        tally.unclean.append(f"{path}: {type(e).__name__}: {e}")


async def run_batch(url: str, n: int, concurrency: int, rng: random.Random, start_i: int, tally: Tally,
                    on_half: Any = None) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, limits=limits,
                                 timeout=120) as client:
        queue = list(range(start_i, start_i + n))
        seeds = {i: rng.random() for i in queue}

        async def worker() -> None:
            while queue:
                i = queue.pop(0)
                await one(client, random.Random(seeds[i]), i, tally)

        await asyncio.gather(*[worker() for _ in range(concurrency)])


def idle_state(url: str) -> dict[str, float]:
    """/load and the engine gauges once the server has settled (up to 10 s)."""
    h = {"Authorization": f"Bearer {API_KEY}"}
    state: dict[str, float] = {}
    for _ in range(40):
        metrics = httpx.get(url + "/metrics", timeout=10).text
        state = {"server_load": httpx.get(url + "/load", headers=h, timeout=10).json()["server_load"]}
        for line in metrics.splitlines():
            for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
                if line.startswith(name + "{") or line.startswith(name + " "):
                    state[name] = float(line.rsplit(" ", 1)[1])
        if not any(state.values()):
            break
        time.sleep(0.25)
    return state


async def sigterm_with_requests_in_flight(server: Server, concurrency: int, rng: random.Random,
                                          tally: Tally) -> dict[str, Any]:
    """Starts ``concurrency`` requests (an eighth of them 400-token streams), sends SIGTERM once
    they run, and lets them end: the short ones finish within --shutdown-timeout, the long ones
    end with an error event."""
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=120) as client:
        tasks = [asyncio.ensure_future(one(client, random.Random(rng.random()), -1, tally, long=k % 8 == 0))
                 for k in range(concurrency)]
        await asyncio.sleep(1.0)
        exit_s, code = await asyncio.to_thread(server.stop)
        await asyncio.gather(*tasks)
    return {"exit_s": round(exit_s, 2), "returncode": code}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the tests' tiny random Llama")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1000,
                    help="requests before the RSS baseline of each server lifetime: native memory (torch, "
                         "oneDNN, the allocator) grows while it first sees each batch shape, and levels off "
                         "after about 1,500 requests on the tiny model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="soak-")
    model = args.model
    if model is None:
        sys.path.insert(0, ROOT)
        from tests.server.tiny_model import write_tiny_llama
        model = write_tiny_llama(os.path.join(tmp, "tiny-llama"))
    extra = ["--max-num-seqs", str(args.concurrency), "--kv-cache-memory", "64MiB", "--shutdown-timeout", "5"]
    if args.model is None:
        extra += ["--dtype", "float32", "--served-model-name", "tiny"]
    server = Server(model, args.port, os.path.join(tmp, "server.log"), extra)
    rng = random.Random(args.seed)
    half = args.requests // 2
    phases: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for phase in (0, 1):
        tally = Tally()
        start_s = server.start()
        asyncio.run(run_batch(server.url, args.warmup, args.concurrency, rng, 10**6 * (phase + 1), Tally()))
        idle_state(server.url)
        rss_warm = server.rss_mib()
        t = time.monotonic()
        trace = []
        for start in range(0, half, 250):
            n = min(250, half - start)
            asyncio.run(run_batch(server.url, n, args.concurrency, rng, phase * half + start, tally))
            trace.append(round(server.rss_mib(), 1))
        elapsed = time.monotonic() - t
        idle = idle_state(server.url)
        rss_end = server.rss_mib()
        record: dict[str, Any] = {"phase": phase, "start_s": round(start_s, 1), "requests": half,
                                  "elapsed_s": round(elapsed, 1), "req_per_s": round(half / elapsed, 1),
                                  "idle_after": idle, "rss_warm_mib": round(rss_warm, 1),
                                  "rss_end_mib": round(rss_end, 1), "rss_every_250_mib": trace,
                                  "rss_growth_pct": round(100 * (rss_end - rss_warm) / rss_warm, 2)}
        if phase == 0:
            shutdown_tally = Tally()
            record["sigterm"] = asyncio.run(sigterm_with_requests_in_flight(server, args.concurrency, rng,
                                                                             shutdown_tally))
            record["sigterm"]["tally"] = asdict(shutdown_tally)
        else:
            server.stop()
        record["tally"] = asdict(tally)
        phases.append(record)
        print(json.dumps(record), flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    unclean = sum(len(p["tally"]["unclean"]) + len(p.get("sigterm", {}).get("tally", {}).get("unclean", []))
                  for p in phases)
    result = {"command": "python benchmarks/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpu": model_name, "cores": os.cpu_count(), "python": platform.python_version(),
              "model": args.model or "tiny random Llama (tests/server/tiny_model.py)",
              "requests": args.requests, "concurrency": args.concurrency, "total_s": round(time.monotonic() - t0, 1),
              "unclean": unclean, "phases": phases}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}))
    return 0 if unclean == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
