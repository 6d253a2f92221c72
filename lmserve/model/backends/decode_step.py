"""The native one-call decode step as a backend of a whole Llama-family model.

``build_decode_step(model, plan)`` runs after every layer has its backend: it gives the model a
``LlamaDecodeStep`` (``cpu_kernels/decode_step.py``) where every linear layer runs on the VNNI
GEMV (GGUF blocks kept quantized), or every one on the bf16 panel GEMM, and says why not
otherwise. The model's forward then runs each step the step ``takes`` (decode-only, up to
``max_rows`` sequences) through it and every other step layer by layer.
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.model.backends.linear import LinearBackend, PanelWeight, PrepackedLinear
from lmserve.model.backends.plan import BackendPlan, Choice
from lmserve.model.backends.quantized import MAX_ROWS as INT_KERNEL_MAX_ROWS
from lmserve.model.backends.quantized import BlockQuantLinear, VnniWeight
from lmserve.model.layers.cpu_kernels.cpu_ops import DTYPE_CODES, QGEMV_MAX_K
from lmserve.model.layers.cpu_kernels.abi import Layer, QLinear
from lmserve.model.layers.cpu_kernels.decode_step import LlamaDecodeStep, decode_step_library

# sequences per step on the VNNI GEMV: where the eager path runs it (more rows take the dense weight)
VNNI_MAX_ROWS = INT_KERNEL_MAX_ROWS["vnni"]
# sequences per step on bf16 panels (the eager path takes any; this bounds the step's buffers)
PANEL_MAX_ROWS = 256


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _qlinear(module: nn.Module) -> QLinear | None:
    """The VNNI weight, or the bf16 panels, of a (merged) linear layer as the C struct, or None if
    its backend has neither."""
    backend: LinearBackend = module.backend
    if isinstance(backend, BlockQuantLinear) and isinstance(backend.qweight, VnniWeight):
        w = backend.qweight
        return QLinear(qw=w.qw.data_ptr(), d=w.d.data_ptr(), m=w.m.data_ptr(), bias=_ptr(module.bias),
                       n=w.out_features, k=w.in_features, nibbles=int(w.nibbles), panels=None, amx=0)
    if isinstance(backend, PrepackedLinear) and isinstance(backend.packed, PanelWeight):
        p = backend.packed
        if p.dtype == torch.bfloat16 and (module.bias is None or module.bias.dtype == torch.bfloat16):
            n, k = p.shape
            return QLinear(qw=None, d=None, m=None, bias=_ptr(module.bias), n=n, k=k, nibbles=0,
                           panels=p.panels.data_ptr(), amx=int(p.backend == "sbgemm_amx"))
    return None


def _tp_note(model: nn.Module) -> str:
    tp_size = getattr(getattr(model, "parallel", None), "tp_size", 1)
    return f"; this rank's shards, all-reduced by callback ({tp_size} ranks)" if tp_size > 1 else ""


def build_decode_step(model: nn.Module, plan: BackendPlan) -> tuple[LlamaDecodeStep | None, Choice]:
    """The step for ``model`` and the table row saying why (or why not): it applies to a CPU
    Llama-family causal LM in fp32/bf16 whose linear layers all run on the VNNI GEMV or all on bf16
    panels, with one norm epsilon and one attention scale, within the kernels' shape limits."""
    allowed = plan.decode_step()
    if allowed.backend != "native":
        return None, allowed
    lib = decode_step_library()
    inner = getattr(model, "model", None)
    if lib is None or inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return None, Choice("eager", "not a Llama-family causal LM")
    if getattr(inner, "pp_size", 1) > 1:
        return None, Choice("eager", "a pipeline stage (its part of the layers) runs layer by layer")
    dtype = inner.embed_tokens.weight.dtype
    if dtype not in DTYPE_CODES or inner.embed_tokens.weight.device.type != "cpu" or \
            inner.rotary_emb.cos_sin_cache.dtype != dtype:
        return None, Choice("eager", f"{dtype} weights")
    if inner.rotary_emb.head_dim != inner.layers[0].self_attn.head_dim:
        return None, Choice("eager", "partial rotary embedding")
    eps = inner.norm.variance_epsilon
    layers, kinds = [], set()
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [_qlinear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        head_norms = (attn.q_norm, attn.k_norm) if attn.qk_norm else ()
        if any(q is None for q in linears):
            return None, Choice("eager", "a linear layer is neither on the VNNI GEMV nor on bf16 panels")
        if any(n.variance_epsilon != eps for n in norms + head_norms) or \
                attn.attn.scale != inner.layers[0].self_attn.attn.scale:
            return None, Choice("eager", "layers differ in norm epsilon or attention scale")
        kinds.update(bool(q.panels) for q in linears)
        q_norm, k_norm = [n.weight.data_ptr() for n in head_norms] or [None, None]
        layers.append(Layer(input_norm=norms[0].weight.data_ptr(), post_norm=norms[1].weight.data_ptr(),
                            q_norm=q_norm, k_norm=k_norm, qkv=linears[0], o=linears[1], gate_up=linears[2],
                            down=linears[3], kv_cache=None, num_blocks=0, sliding_window=attn.attn.sliding_window or 0))
    if not layers or len(kinds) != 1:
        return None, Choice("eager", "linear layers mix the VNNI GEMV and bf16 panels")
    if kinds == {True}:
        if dtype != torch.bfloat16:
            return None, Choice("eager", "panel weights are not bf16")
        return LlamaDecodeStep(lib, model, layers, dtype, PANEL_MAX_ROWS), \
            Choice("native", f"bf16 panels, up to {PANEL_MAX_ROWS} sequences{_tp_note(model)}")
    cfg, attn0 = model.config, inner.layers[0].self_attn
    inter = inner.layers[0].mlp.down_proj.in_features  # this rank's share under tensor parallelism
    if max(cfg.hidden_size, inter, attn0.head_dim * attn0.num_heads) > QGEMV_MAX_K:
        return None, Choice("eager", f"a dimension above the VNNI GEMV's {QGEMV_MAX_K}")
    return LlamaDecodeStep(lib, model, layers, dtype, VNNI_MAX_ROWS), \
        Choice("native", f"VNNI GEMV, up to {VNNI_MAX_ROWS} sequences{_tp_note(model)}")
