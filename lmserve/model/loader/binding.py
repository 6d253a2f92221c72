"""Give every layer of a loaded model its compute backend, once, and say what was chosen.

``bind_backends(model, plan)`` walks the model: each ``Linear`` (and a tied lm_head), ``RMSNorm``,
``RotaryEmbedding``, ``SiluAndMul`` and ``PagedAttention`` asks ``plan`` for its backend, which is
built (weights packed, block-quantized weights packed for their integer kernel) and installed as
the layer's ``backend``; then a Llama-family causal LM gets its native decode step where that
applies. It returns a ``BackendTable``, which ``get_model`` logs as one table at start-up. With
``apply=False`` it only fills the table (a simulated plan can be read that way, not applied).
Call it once, after the weights are loaded and the model is on its device.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from lmserve.model.backends.attention import NativePagedAttention
from lmserve.model.backends.decode_step import build_decode_step
from lmserve.model.backends.elementwise import NativeRMSNorm, NativeRope, NativeSiluAndMul
from lmserve.model.backends.linear import (ONEDNN_BATCH_HINT, LinearBackend, PrepackedLinear, TorchLinear,
                                           pack_dense)
from lmserve.model.backends.plan import BackendPlan, Choice
from lmserve.model.backends.quantized import BlockQuantLinear, pack_int_weight, vnni_takes
from lmserve.model.layers.activation import GeluAndMul, SiluAndMul
from lmserve.model.layers.attention import PagedAttention
from lmserve.model.layers.fused_moe import FusedMoE
from lmserve.model.layers.linear import Linear, VocabEmbedding
from lmserve.model.layers.norm import RMSNorm
from lmserve.model.layers.rotary import RotaryEmbedding

_PANEL_BF16 = ("sbgemm", "sbgemm_amx")


@dataclass
class BackendTable:
    """What each kind of layer runs on: (op, backend, reason) -> number of layers."""

    header: str
    rows: Counter = field(default_factory=Counter)

    def add(self, op: str, choice: Choice) -> None:
        self.rows[(op, choice.backend, choice.reason)] += 1

    def backends(self, op: str) -> set[str]:
        """The backends chosen for ``op`` (e.g. "linear", "attention", "decode_step")."""
        return {backend for (o, backend, _), _n in self.rows.items() if o == op}

    def format(self) -> str:
        rows = [("op", "backend", "layers", "why")] + [(op, b, str(n), why) for (op, b, why), n in self.rows.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"  {op:<{widths[0]}}  {b:<{widths[1]}}  {n:>{widths[2]}}  {why}" for op, b, n, why in rows]
        return "\n".join([self.header] + lines)


def dense_backend(plan: BackendPlan, weight: torch.Tensor, in_features: int) -> tuple[LinearBackend, Choice]:
    """The plan's dense backend for ``weight`` [N, K=in_features] (packed when it is not torch) and why."""
    choice = plan.linear(weight.dtype, in_features)
    if choice.backend == "torch":
        return TorchLinear(), choice
    panel = plan.native.panels.get(choice.backend) if plan.native is not None else None
    return PrepackedLinear(pack_dense(weight, choice.backend, panel)), choice


def _linear_backend(plan: BackendPlan, weight: torch.Tensor, in_features: int, blocks: list | None,
                    apply: bool) -> tuple[LinearBackend | None, Choice]:
    """The backend of a layer with dense ``weight`` (and the file's ``blocks`` when it stays
    block-quantized), or only the choice when not ``apply``."""
    if not apply:
        dense_choice = plan.linear(weight.dtype, in_features)
        dense = None
    else:
        dense, dense_choice = dense_backend(plan, weight, in_features)
    if not blocks or plan.device_type != "cpu":
        return dense, dense_choice
    int_choice = plan.block_quant(vnni_takes(blocks))
    choice = Choice(f"{int_choice.backend} + {dense_choice.backend}",
                    f"{int_choice.reason}; many rows: {dense_choice.reason}")
    if not apply:
        return None, choice
    ops = plan.native.ops if plan.native is not None and int_choice.backend == "vnni" else None
    qweight = pack_int_weight(blocks, ops)
    if qweight is None:
        return dense, Choice(dense_choice.backend, "shards of different block layouts: dense only")
    backend = BlockQuantLinear(qweight, dense)
    return backend, Choice(backend.name, choice.reason)


def _bind_linear(module: nn.Module, op: str, plan: BackendPlan, table: BackendTable, apply: bool) -> str:
    is_head_table = isinstance(module, VocabEmbedding)
    weight = module.weight
    blocks = getattr(module, "blocks", None)
    backend, choice = _linear_backend(plan, weight, weight.shape[1], blocks, apply)
    table.add(op, choice)
    if apply:
        if is_head_table:
            module.head_backend = backend
        else:
            module.backend = backend
            packed = backend.dense if isinstance(backend, BlockQuantLinear) else backend
            if isinstance(packed, PrepackedLinear):  # the weight lives in the packed layout only
                module.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
        if blocks is not None:
            module.blocks = None
    return choice.backend


def _bind_experts(module: FusedMoE, plan: BackendPlan, apply: bool) -> Choice:
    """A MoE layer's experts: each expert's two matrices packed for the plan's dense CPU backend where
    that is one of lmserve's panel GEMMs (``FusedMoE.set_packed_experts``); else the stacked weights
    stay on torch (where the plan says torch, and where it says oneDNN, which measured slower than
    torch for the few rows an expert gets in a decode step)."""
    w13, w2 = module.experts.gate_up_proj, module.experts.down_proj
    c13, c2 = plan.linear(w13.dtype, w13.shape[2]), plan.linear(w2.dtype, w2.shape[2])
    if plan.device_type != "cpu" or "torch" in (c13.backend, c2.backend):
        return Choice("torch", f"stacked experts, grouped GEMM per expert; {c13.reason}")
    if "onednn" in (c13.backend, c2.backend):  # measured: benchmarks/README.md, "Mixture-of-experts decode"
        return Choice("torch", "stacked experts, grouped GEMM per expert: oneDNN's blocked layout is tuned for "
                               f"{ONEDNN_BATCH_HINT} rows and an expert sees a few per decode step")
    if apply:
        packed = []
        for e in range(module.num_experts):
            b13, _ = dense_backend(plan, w13[e], w13.shape[2])
            b2, _ = dense_backend(plan, w2[e], w2.shape[2])
            packed.append((b13.packed, b2.packed))
        module.set_packed_experts(packed)
    backend = c13.backend if c13.backend == c2.backend else f"{c13.backend} / {c2.backend}"
    return Choice(f"{backend} per expert", f"grouped dispatch; {c13.reason}")


def _simulated_decode_step(model: nn.Module, plan: BackendPlan, linear_names: dict[int, str]) -> Choice:
    """The decode step's row for a plan that is only read (``apply=False``)."""
    allowed = plan.decode_step()
    inner = getattr(model, "model", None)
    if allowed.backend != "native" or inner is None or not hasattr(inner, "rotary_emb"):
        return allowed if allowed.backend != "native" else Choice("eager", "not a Llama-family causal LM")
    if inner.rotary_emb.head_dim != inner.layers[0].self_attn.head_dim:
        return Choice("eager", "partial rotary embedding")
    names = {linear_names.get(id(m), "") for layer in inner.layers
             for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)}
    kinds = {n.split(" + ")[0] for n in names}
    if kinds == {"vnni"}:
        return Choice("native", "VNNI GEMV")
    if kinds <= set(_PANEL_BF16) and plan.dtype == torch.bfloat16:
        return Choice("native", "bf16 panels")
    return Choice("eager", "a linear layer is neither on the VNNI GEMV nor on bf16 panels")


def bind_backends(model: nn.Module, plan: BackendPlan, apply: bool = True) -> BackendTable:
    """See the module docstring. ValueError if a layer of ``model`` already has a packed backend."""
    if apply and any(isinstance(m, Linear) and not isinstance(m.backend, TorchLinear) for m in model.modules()):
        raise ValueError("bind_backends: the model's layers already have their backends (bind once, after loading)")
    table = BackendTable(f"Compute backends ({plan.device_type}, {plan.dtype}; CPU features: {plan.cpu}; "
                         f"kernel settings: {plan.settings.describe()}):")
    head = getattr(model, "lm_head", None)
    ops = plan.native.ops if plan.native is not None else None
    linear_names: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, Linear):
            linear_names[id(module)] = _bind_linear(module, "lm_head" if module is head else "linear", plan, table,
                                                    apply)
        elif isinstance(module, VocabEmbedding) and module is head:
            _bind_linear(module, "lm_head (tied)", plan, table, apply)
        elif isinstance(module, RMSNorm):
            choice = plan.rms_norm(module.weight.dtype, module.weight.shape[0])
            table.add("rms_norm", choice)
            if apply and choice.backend == "native":
                module.backend = NativeRMSNorm(ops)
        elif isinstance(module, RotaryEmbedding):
            choice = plan.rope(module.cos_sin_cache.dtype, module.head_dim)
            table.add("rope", choice)
            if apply and choice.backend == "native":
                module.backend = NativeRope(ops)
        elif isinstance(module, SiluAndMul):
            choice = plan.silu_and_mul(plan.dtype)
            table.add("silu_and_mul", choice)
            if apply and choice.backend == "native":
                module.backend = NativeSiluAndMul(ops)
        elif isinstance(module, PagedAttention):
            choice = plan.attention(plan.dtype, module.head_dim, module.sliding_window, module.logits_soft_cap)
            table.add("attention", choice)
            if apply and choice.backend != "torch":
                module.backend = NativePagedAttention(plan.native.attention, amx_chunks="AMX" in choice.backend,
                                                      sdpa_on_amx=plan.sdpa_on_amx)
        elif isinstance(module, GeluAndMul):
            table.add("gelu_and_mul", Choice("torch", "no native GELU kernel"))
        elif isinstance(module, FusedMoE):
            table.add("moe_experts", _bind_experts(module, plan, apply))
        elif isinstance(module, nn.LayerNorm):
            table.add("layer_norm", Choice("torch", "torch's LayerNorm"))
    if hasattr(model, "decode_step"):
        if apply:
            model.decode_step, choice = build_decode_step(model, plan)
        else:
            choice = _simulated_decode_step(model, plan, linear_names)
        table.add("decode_step", choice)
    return table
