r"""W3 against llama.cpp's server: SmolLM2-135M-Instruct from the same Q4_1 GGUF file, one stream,
64-token prompts, 256 output tokens, lmserve and llama.cpp (``/work/shared/anchors/llama-cpp``,
llama-cpp-python's server) one after the other on the same machine, measured by one client.

    python benchmarks/single_stream.py [--out benchmarks/results/DATE] [--requests 8]

Why not ``lmserve bench serve`` / ``vllm bench serve`` here: llama-cpp-python's server rejects
token-id prompts (HTTP 400) and ignores ``ignore_eos``. So this client sends the prompts as text
(random token ids decoded by the model's tokenizer, the same texts to both servers) and forbids
the end-of-text tokens with ``logit_bias`` (-100), which both servers honour, so every request
streams exactly 256 tokens (checked: each must end with finish_reason "length"). Greedy decoding
(temperature 0). Per server: start, wait until it answers, two untimed warm-up requests, then the
timed ones one at a time. TTFT: request sent to first text chunk; TPOT: (last chunk - first
chunk) / 255; tok/s: 256 / (last chunk - request sent); the median of each over the requests.
(Chunks are not counted as tokens: a server may hold back a token that ends inside a UTF-8
character and send it with the next.)
Writes ``single_stream.md`` and ``single_stream.json`` under ``--out``; the servers' logs go to its
``logs/``, which git ignores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import urllib.request
from datetime import datetime
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers as sv  # noqa: E402
from workloads import default_gguf, model_dir  # noqa: E402

INPUT_LEN, OUTPUT_LEN = 64, 256
PORTS = {"lmserve": 8110, "llama-cpp": 8210}


def prompts(tokenizer: Any, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [tokenizer.decode([rng.randrange(1000, 40000) for _ in range(INPUT_LEN)]) for _ in range(n)]


def stream_one(base_url: str, model: str, prompt: str, banned: list[int]) -> dict[str, float]:
    body = {"model": model, "prompt": prompt, "max_tokens": OUTPUT_LEN, "temperature": 0, "stream": True,
            "logit_bias": {str(t): -100 for t in banned}}
    req = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times, finish = [], None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    choice = chunk["choices"][0]
                    finish = choice.get("finish_reason") or finish
                    if choice.get("text"):
                        times.append(time.perf_counter())
    if finish != "length" or len(times) < 2:  # an end-of-text got through, or an empty stream
        raise RuntimeError(f"{base_url}: finish_reason {finish!r} after {len(times)} chunks")
    # OUTPUT_LEN tokens (finish "length"); a chunk may carry two (a character split across tokens)
    return {"ttft_ms": (times[0] - t0) * 1e3, "tpot_ms": (times[-1] - times[0]) / (OUTPUT_LEN - 1) * 1e3,
            "tok_s": OUTPUT_LEN / (times[-1] - t0), "chunks": len(times)}


def measure(server: str, gguf: str, texts: list[str], banned: list[int], out: str) -> dict[str, Any]:
    name = "smollm2"
    log_path = os.path.join(out, "logs", f"single-stream-{server}.log")
    with open(log_path, "w") as log:
        srv = sv.Server(server, gguf, name, PORTS[server], log, dtype=sv.bench_dtype())
        try:
            startup = srv.wait_ready(600)
            served = name if server == "lmserve" else os.path.basename(gguf)[: -len(".gguf")]
            for text in texts[:2]:
                stream_one(srv.base_url, served, text[::-1], banned)  # warm-up, other texts
            runs = [stream_one(srv.base_url, served, text, banned) for text in texts]
        finally:
            srv.stop()
    med = {k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "tpot_ms", "tok_s")}
    print(f"{server}: {med['tok_s']:.1f} tok/s, TPOT {med['tpot_ms']:.2f} ms, TTFT {med['ttft_ms']:.1f} ms", flush=True)
    return {"server": server, "startup_s": startup, "median": med, "runs": runs}


def llama_cpp_build(out: str) -> str:
    """Which llama.cpp ran: its environment (``LLAMA_CPP_VENV``, read by the anchor script) and the
    CPU features its build uses, as its server log prints them."""
    venv = os.environ.get("LLAMA_CPP_VENV", "the anchor script's default environment")
    features = ""
    with open(os.path.join(out, "logs", "single-stream-llama-cpp.log"), errors="replace") as f:
        for line in f:
            if line.startswith("CPU : "):
                features = ", CPU features " + line[len("CPU : "):].strip().rstrip(" |")
                break
    return f" (environment {venv}{features})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", datetime.now().strftime("%Y-%m-%d")))
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    from transformers import AutoTokenizer

    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(model_dir("smollm2-135m-bf16"))
    # the ids that end a text (eos, bos, pad): few, since llama-cpp-python applies logit_bias in Python
    banned = sorted({t for t in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) if t is not None})
    texts = prompts(tok, args.requests, args.seed)
    results = [measure(s, gguf, texts, banned, args.out) for s in ("llama-cpp", "lmserve")]
    by = {r["server"]: r["median"] for r in results}
    rows = ["| server | tok/s | TPOT ms | TTFT ms |", "|---|---:|---:|---:|"]
    rows += [f"| {r['server']} | {r['median']['tok_s']:.1f} | {r['median']['tpot_ms']:.2f} | "
             f"{r['median']['ttft_ms']:.1f} |" for r in results]
    ratio = {k: by["lmserve"][k] / by["llama-cpp"][k] for k in ("tok_s", "tpot_ms", "ttft_ms")}
    rows.append(f"| **lmserve / llama.cpp** | {ratio['tok_s']:.2f}× | {ratio['tpot_ms']:.2f}× | {ratio['ttft_ms']:.2f}× |")
    head = (f"# W3, single stream: lmserve vs llama.cpp on {os.path.basename(gguf)}: "
            f"{datetime.now():%Y-%m-%d %H:%M}\n\n{args.requests} requests one at a time, {INPUT_LEN}-token text "
            f"prompts, {OUTPUT_LEN} output tokens (end-of-text forbidden by logit_bias), greedy; medians. "
            f"lmserve in {sv.bench_dtype()} with the GGUF's weights kept quantized; llama.cpp with "
            f"{os.cpu_count()} threads{llama_cpp_build(args.out)}. Client: `benchmarks/single_stream.py`.\n\n")
    with open(os.path.join(args.out, "single_stream.md"), "w") as f:
        f.write(head + "\n".join(rows) + "\n")
    with open(os.path.join(args.out, "single_stream.json"), "w") as f:
        json.dump({"gguf": gguf, "results": results, "ratio": ratio}, f, indent=1)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
