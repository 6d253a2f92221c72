"""Embeddings per second: lmserve's ``LLM.embed`` and its ``/v1/embeddings`` (official ``openai``
client) against sentence-transformers' ``encode``, on the same MiniLM files, measured in one run
with the runs interleaved (lmserve, sentence-transformers, server, lmserve, ...), so that other work
on a shared machine falls on all sides alike; medians and the ratios of medians are reported.

The workload is N sentences of varied length (a seeded mix of 4 to 120 words drawn from a fixed
vocabulary, so every run embeds the same texts). Every side embeds all N once to warm up, then once
per round, timed; the figure is N / wall seconds. sentence-transformers runs with its defaults
(batch_size 32, length-sorted batches, float32); ``LLM.embed`` with lmserve's defaults (one call
with all N texts: continuous batching under the scheduler's token budget, a float32 checkpoint kept
in float32); the server (``lmserve serve MODEL``, defaults, started by this script) gets the N texts
as requests of ``--request-batch`` inputs, ``--concurrency`` in flight. The report gives the
agreement (min cosine between lmserve's and sentence-transformers' embeddings), the GFLOP/s each
side reached (2 x encoder linear weights x tokens; attention adds < 5 % at these lengths) against
the fp32 and bf16 matmul peaks measured in the same run, and the CPU time other processes (not this
one, not the server's) used during each timed run. On a shared machine, besides the medians, the
fastest run of each side and the CPU seconds each side used (this process, plus the server's process
tree for /v1/embeddings) are given, with their ratios.

Usage: ``python benchmarks/embeddings_throughput.py [--num-sentences 1000] [--rounds 5] [--no-server]
[--output-dir benchmarks/results/<date>-embeddings]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_throughput import OtherCpu  # noqa: E402
from roofline import measure_matmul  # noqa: E402
from servers import tree_cpu_seconds  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be has had "
         "model server request token batch kernel memory cache latency throughput vector embedding query "
         "document paris france capital river mountain history science music language computer network "
         "bridge winter summer garden ocean library market engine station ancient modern quickly slowly "
         "because although however therefore meanwhile elephant violin harbor telescope algorithm").split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice([rng.randint(4, 16)] * 3 + [rng.randint(17, 60), rng.randint(61, 120)])
        words = [rng.choice(WORDS) for _ in range(length)]
        out.append(" ".join(words).capitalize() + ".")
    return out


def minilm_path() -> str:
    from lmserve.model.loader.resolve import default_embedding_model
    return default_embedding_model()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class EmbeddingsServer:
    """``lmserve serve MODEL`` on a free local port, in its own process group."""

    def __init__(self, model: str, log_path: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lmserve.entrypoints.cli", "serve", model, "--host",
                                      "127.0.0.1", "--port", str(self.port), "--served-model-name", "minilm",
                                      "--disable-log-requests"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmserve serve exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError("lmserve serve not healthy in time")

    def stop(self) -> None:
        import signal
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def _own_cpu_seconds() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-sentences", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5, help="timed runs per side, interleaved")
    ap.add_argument("--no-server", action="store_true", help="skip /v1/embeddings")
    ap.add_argument("--request-batch", type=int, default=64, help="inputs per /v1/embeddings request")
    ap.add_argument("--concurrency", type=int, default=4, help="/v1/embeddings requests in flight")
    ap.add_argument("--output-dir", help="write results.json and table.md here")
    args = ap.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    from lmserve import LLM

    path = minilm_path()
    sentences = make_sentences(args.num_sentences)
    st = SentenceTransformer(path, device="cpu")
    llm = LLM(path)
    tok = llm.get_tokenizer()
    max_len = llm.llm_engine.model_config.max_model_len
    num_tokens = sum(len(ids) for ids in tok(sentences, truncation=True, max_length=max_len)["input_ids"])
    cfg = llm.llm_engine.model_config.hf_config
    linear_params = cfg.num_hidden_layers * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.intermediate_size)
    flops = 2 * linear_params * num_tokens

    def run_st():
        return torch.as_tensor(st.encode(sentences, convert_to_numpy=True))

    def run_llm():
        outs = llm.embed(sentences, truncate_prompt_tokens=-1)
        return torch.tensor([o.outputs.embedding for o in outs])

    sides = {"sentence-transformers encode": run_st, "lmserve LLM.embed": run_llm}
    server = None
    if not args.no_server:
        import openai
        import tempfile
        server = EmbeddingsServer(path, os.path.join(tempfile.gettempdir(), f"lmserve_embeddings_server_{os.getpid()}.log"))
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=600)
        batches = [sentences[i:i + args.request_batch] for i in range(0, len(sentences), args.request_batch)]
        pool = ThreadPoolExecutor(args.concurrency)

        def run_server():
            def one(batch):
                r = client.embeddings.create(model="minilm", input=batch)
                return [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
            rows = [e for part in pool.map(one, batches) for e in part]
            return torch.tensor(rows)

        sides["lmserve /v1/embeddings (openai client)"] = run_server
    try:
        results = {name: fn() for name, fn in sides.items()}  # warm-up; also the embeddings compared
        peak32 = measure_matmul(1024, torch.float32, 3)
        peak16 = measure_matmul(1024, torch.bfloat16, 3) if llm.llm_engine.model_config.dtype != torch.bfloat16 else None
        walls: dict[str, list[float]] = {name: [] for name in sides}
        others: dict[str, list[float]] = {name: [] for name in sides}
        cpus: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, fn in sides.items():
                probe = OtherCpu()
                server_cpu0 = tree_cpu_seconds(server.proc.pid) if server is not None else 0.0
                own0 = _own_cpu_seconds()
                probe.start()
                t0 = time.perf_counter()
                fn()
                walls[name].append(time.perf_counter() - t0)
                other = probe.stop()
                server_cpu = tree_cpu_seconds(server.proc.pid) - server_cpu0 if server is not None else 0.0
                others[name].append(max(0.0, other - server_cpu))  # the server's own work is not someone else's
                cpus[name].append(_own_cpu_seconds() - own0 + server_cpu)
    finally:
        if server is not None:
            server.stop()

    ref_name = "sentence-transformers encode"
    ref = results[ref_name]
    st_median, st_min = statistics.median(walls[ref_name]), min(walls[ref_name])
    st_cpu = statistics.median(cpus[ref_name])
    rows = []
    for name in sides:
        med = statistics.median(walls[name])
        cos = torch.nn.functional.cosine_similarity(results[name].float(), ref.float(), dim=-1)
        rows.append({"side": name, "median_s": med, "walls_s": walls[name], "embeddings_per_s": args.num_sentences / med,
                     "tokens_per_s": num_tokens / med, "gflops": flops / med / 1e9,
                     "ratio_vs_sentence_transformers": st_median / med, "min_wall_s": min(walls[name]),
                     "ratio_of_min_walls": st_min / min(walls[name]), "cpu_s": cpus[name],
                     "ratio_of_median_cpu_s": st_cpu / statistics.median(cpus[name]),
                     "min_cosine_vs_st": cos.min().item(), "other_cpu_s": others[name]})
    threads = torch.get_num_threads()
    head = (f"MiniLM-L6 ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}), {args.num_sentences} sentences, "
            f"{num_tokens} tokens (mean {num_tokens / args.num_sentences:.1f}), CPU: {cpu_name()}, {os.cpu_count()} "
            f"cores, torch threads {threads}; median of {args.rounds} interleaved rounds")
    peaks = f"matmul peaks measured in this run: fp32 {peak32:.0f} GFLOP/s" + (
        f", bf16 {peak16:.0f} GFLOP/s" if peak16 else "")
    lines = [head, peaks, "",
             "| side | median s | embeddings/s | GFLOP/s (% of fp32 peak) | vs ST (medians) | min s | vs ST (mins) "
             "| CPU s (median) | vs ST (CPU s) | min cosine vs ST | other CPU s (max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['side']} | {r['median_s']:.2f} | {r['embeddings_per_s']:.0f} | "
                     f"{r['gflops']:.0f} ({100 * r['gflops'] / peak32:.0f}%) | {r['ratio_vs_sentence_transformers']:.2f}x "
                     f"| {r['min_wall_s']:.2f} | {r['ratio_of_min_walls']:.2f}x | {statistics.median(r['cpu_s']):.2f} "
                     f"| {r['ratio_of_median_cpu_s']:.2f}x | {r['min_cosine_vs_st']:.6f} | {max(r['other_cpu_s']):.2f} |")
    contended = any(max(r["other_cpu_s"]) > 0.2 * r["median_s"] for r in rows)
    if contended:
        lines += ["", "WARNING: other processes used the CPU during timed runs (other CPU s above 20 % of the "
                      "wall): the runs were interleaved, so the ratios hold better than the absolute figures."]
    print("\n".join(lines))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "table.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        meta = {"model": path, "num_sentences": args.num_sentences, "num_tokens": num_tokens, "rounds": args.rounds,
                "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
                "dtype": str(llm.llm_engine.model_config.dtype), "fp32_peak_gflops": peak32,
                "bf16_peak_gflops": peak16, "linear_flops_per_pass": flops, "request_batch": args.request_batch,
                "concurrency": args.concurrency, "lmserve_cpu_gemm": os.environ.get("LMSERVE_CPU_GEMM", "auto"),
                "contended": contended, "sides": rows}
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
