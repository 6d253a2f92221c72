"""The machine's roofline, measured in the calling process, and the bounds it puts on an
offline generation workload.

Two measurements (each the best of a few repetitions, so that a stray scheduler tick does
not lower the figure):

- memory bandwidth: ``tensor.sum()`` over a buffer far larger than the last-level cache
  (bytes read / s), and ``dst.copy_(src)`` (bytes read + written / s);
- matmul throughput: ``torch.matmul`` of two ``n x n`` matrices in float32 and bfloat16
  (2 n^3 FLOPs per product).

The workload bounds (``workload_bounds``) follow the roofline model of DESIGN.md:

- a decode step reads every weight once (plus the KV cache of every running sequence), so
  its time is at least ``bytes / bandwidth``;
- every token costs ``2 x params`` FLOPs in the matmuls (plus ``4 x layers x q_heads x
  head_dim x context`` in attention), so a step is at least ``FLOPs / matmul peak``;
- the workload's floor is the sum over its steps of the larger of the two. It assumes the
  ideal schedule: all N prompts prefilled together, then O - 1 decode steps of batch N
  (the first output token comes from the prefill).

Usage as a script prints the machine figures: ``python benchmarks/roofline.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class MachineRoofline:
    read_gbps: float  # GB/s (1e9 bytes), tensor.sum over a large buffer
    copy_gbps: float  # GB/s counting bytes read + bytes written, dst.copy_(src)
    matmul_gflops_fp32: float
    matmul_gflops_bf16: float
    threads: int
    buffer_mib: int
    matmul_n: int

    @property
    def bandwidth_gbps(self) -> float:
        """The figure used for bounds: weights and KV are read, not written, per step."""
        return self.read_gbps

    def matmul_gflops(self, dtype: torch.dtype) -> float:
        return self.matmul_gflops_bf16 if dtype in (torch.bfloat16, torch.float16) else self.matmul_gflops_fp32


def _best_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(buffer_mib: int = 1024, repeats: int = 5) -> tuple[float, float]:
    """(read GB/s, copy GB/s) on float32 buffers of ``buffer_mib`` MiB each."""
    n = buffer_mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    nbytes = src.numel() * src.element_size()
    t_read = _best_seconds(lambda: src.sum(), repeats)
    t_copy = _best_seconds(lambda: dst.copy_(src), repeats)
    return nbytes / t_read / 1e9, 2 * nbytes / t_copy / 1e9


def measure_matmul(n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """GFLOP/s of ``a @ b`` for ``n x n`` matrices of ``dtype``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    t = _best_seconds(lambda: torch.matmul(a, b, out=out), repeats)
    return 2 * n**3 / t / 1e9


def measure_machine(buffer_mib: int = 1024, matmul_n: int = 2048, repeats: int = 5) -> MachineRoofline:
    from lmserve.config import cpu_has_fast_bf16

    read, copy = measure_bandwidth(buffer_mib, repeats)
    # without native bf16 the emulated matmul runs at ~1 GFLOP/s: a 512 matrix measures it in a second
    bf16_n = matmul_n if cpu_has_fast_bf16() else min(matmul_n, 512)
    return MachineRoofline(read_gbps=read, copy_gbps=copy,
                           matmul_gflops_fp32=measure_matmul(matmul_n, torch.float32, repeats),
                           matmul_gflops_bf16=measure_matmul(bf16_n, torch.bfloat16, repeats),
                           threads=torch.get_num_threads(), buffer_mib=buffer_mib, matmul_n=matmul_n)


# ---------------------------------------------------------------------- the model's shape
@dataclass(frozen=True)
class ModelShape:
    """What the bounds need to know about a decoder-only transformer."""

    body_params: int  # every weight but the input embedding and the LM head
    head_params: int  # vocab x hidden (the LM head; the tied embedding when tied)
    embed_params: int  # input embedding (not counted in FLOPs: a lookup)
    tied: bool
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def unique_params(self) -> int:
        return self.body_params + self.head_params + (0 if self.tied else self.embed_params)

    @property
    def matmul_params(self) -> int:
        """Parameters that a token's logits multiply by: the "params" of 2 x params x tokens."""
        return self.body_params + self.head_params

    @property
    def step_weight_bytes(self) -> int:
        """Bytes one forward pass reads from weights (embedding rows read are negligible)."""
        return self.matmul_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attn_flops_per_query_key(self) -> int:
        """QK^T and PV: 2 FLOPs each per (query, key, q-head, dim)."""
        return 4 * self.num_layers * self.num_q_heads * self.head_dim


def model_shape(model: torch.nn.Module) -> ModelShape:
    """The shape of a Hugging Face ``*ForCausalLM`` (any with ``get_input_embeddings`` and
    ``get_output_embeddings`` and a Llama-like config)."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = embed.data_ptr() == head.data_ptr()
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    embed_n, head_n = embed.numel(), head.numel()
    body = total - head_n - (0 if tied else embed_n)
    q_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    return ModelShape(body_params=body, head_params=head_n, embed_params=embed_n, tied=tied,
                      num_layers=cfg.num_hidden_layers, num_q_heads=q_heads,
                      num_kv_heads=getattr(cfg, "num_key_value_heads", None) or q_heads,
                      head_dim=head_dim, dtype_bytes=head.element_size())


# ---------------------------------------------------------------------- workload bounds
@dataclass(frozen=True)
class WorkloadBounds:
    num_prompts: int
    input_len: int
    output_len: int
    total_flops: float
    total_bytes: float  # ideal schedule: weights once per step + KV cache reads/writes
    flop_bound_s: float  # total_flops / matmul peak
    memory_bound_s: float  # total_bytes / bandwidth
    roofline_s: float  # sum over steps of max(step FLOP time, step memory time)
    decode_step_memory_ms: float  # weight bytes / bandwidth: one decode step's floor
    decode_tok_s_memory_bound: float  # N x bandwidth / weight bytes
    tok_s_flop_bound: float  # matmul peak / (2 x params): any token, prefill or decode

    @property
    def output_tok_s_bound(self) -> float:
        return self.num_prompts * self.output_len / self.roofline_s


def workload_bounds(shape: ModelShape, machine: MachineRoofline, num_prompts: int, input_len: int,
                    output_len: int, dtype: torch.dtype) -> WorkloadBounds:
    """Bounds for N prompts of I tokens each producing O tokens (see the module docstring)."""
    n, i, o = num_prompts, input_len, output_len
    bw = machine.bandwidth_gbps * 1e9
    peak = machine.matmul_gflops(dtype) * 1e9
    p_body, p_head = shape.body_params, shape.head_params
    kv_tok, attn = shape.kv_bytes_per_token, shape.attn_flops_per_query_key

    # Prefill: every prompt token through the body, logits only at each prompt's last token;
    # causal attention over sum_{t=1..I} t = I(I+1)/2 (query, key) pairs per prompt.
    pre_flops = 2 * p_body * n * i + 2 * p_head * n + attn * n * i * (i + 1) / 2
    pre_bytes = shape.step_weight_bytes + kv_tok * n * i  # weights once, KV written once
    total_flops, total_bytes = pre_flops, pre_bytes
    roofline = max(pre_flops / peak, pre_bytes / bw)
    # Decode: O - 1 steps of N tokens; step s attends over a context of I + s keys.
    for s in range(1, o):
        ctx = i + s
        f = 2 * shape.matmul_params * n + attn * n * ctx
        b = shape.step_weight_bytes + kv_tok * n * ctx
        total_flops += f
        total_bytes += b
        roofline += max(f / peak, b / bw)
    step_ms = shape.step_weight_bytes / bw * 1e3
    return WorkloadBounds(num_prompts=n, input_len=i, output_len=o, total_flops=total_flops,
                          total_bytes=total_bytes, flop_bound_s=total_flops / peak,
                          memory_bound_s=total_bytes / bw, roofline_s=roofline,
                          decode_step_memory_ms=step_ms, decode_tok_s_memory_bound=n * 1e3 / step_ms,
                          tok_s_flop_bound=peak / (2 * shape.matmul_params))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--buffer-mib", type=int, default=1024)
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    m = measure_machine(args.buffer_mib, args.matmul_n, args.repeats)
    print(json.dumps(asdict(m), indent=2))


if __name__ == "__main__":
    main()
