"""Test helpers for mixture-of-experts models: tiny Mixtral / Qwen3-MoE configs and checkpoints made
at test time, a GGUF writer that lays MoE tensors out as llama.cpp's converter does, and a naive
per-token reference of the expert dispatch."""

from __future__ import annotations

import torch

from tests.model_utils import _llama_cpp_permute, make_hf_model

_COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=1024, initializer_range=0.2, bos_token_id=1, eos_token_id=2)


def tiny_moe_config(kind: str, **overrides):
    """"mixtral": 6 experts, top-2. "qwen3_moe": 16 experts, top-8, layer 1 dense (mlp_only_layers),
    norm_topk_prob off (the transformers default). ``overrides`` replace any field."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    if kind == "mixtral":
        fields = dict(_COMMON, intermediate_size=64, num_local_experts=6, num_experts_per_tok=2,
                      tie_word_embeddings=False)
        fields.update(overrides)
        return MixtralConfig(**fields)
    if kind == "qwen3_moe":
        fields = dict(_COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=8,
                      mlp_only_layers=[1], decoder_sparse_step=1, head_dim=16, norm_topk_prob=False,
                      tie_word_embeddings=False)
        fields.update(overrides)
        return Qwen3MoeConfig(**fields)
    raise ValueError(kind)


def make_tiny_moe_checkpoint(path: str, kind: str, seed: int = 0, **overrides) -> str:
    """Saves a tiny random MoE causal LM (safetensors, per-expert tensors as transformers saves
    them) to ``path`` and returns it."""
    model = make_hf_model(tiny_moe_config(kind, **overrides), seed=seed)
    model.save_pretrained(path)
    return path


def naive_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """The MoE output token by token, expert by expert (the definition ``fused_moe`` must equal)."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e].double() @ x[t].double()
            act = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[t] += float(weights[t, j]) * (w2[e].double() @ act)
    return out


_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_BLOCK = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
          "mlp.experts.down_proj": "ffn_down_exps.weight"}


def write_tiny_moe_gguf(hf_model, path: str, arch: str, quant: str = "Q8_0") -> None:
    """Write a transformers MoE model (fused ``experts.gate_up_proj`` / ``experts.down_proj``
    parameters) as llama.cpp's converter would: ``arch`` "llama" (Mixtral: Q/K permuted,
    ``expert_count``) or "qwen3moe"; experts stacked as ``ffn_{gate,up,down}_exps`` [E, ...], the
    router ``ffn_gate_inp`` in F32, other matrices and the experts quantized to ``quant``. The
    model's own weights are rounded through the same quantization, so it stays the exact reference."""
    import gguf
    import numpy as np

    cfg = hf_model.config
    qtype = gguf.GGMLQuantizationType[quant]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    moe_type = cfg.model_type
    num_experts = cfg.num_local_experts if moe_type == "mixtral" else cfg.num_experts
    expert_ffn = cfg.intermediate_size if moe_type == "mixtral" else cfg.moe_intermediate_size
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-moe-test-model")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_expert_count(num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if moe_type != "mixtral":
        w.add_expert_feed_forward_length(expert_ffn)

    def add(gname: str, t: torch.Tensor, hf_name: str, quantize: bool) -> None:
        arr = t.detach().float().numpy()
        if quantize:
            q = gguf.quants.quantize(arr, qtype)
            t.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(arr.shape)))
            arr = t.detach().float().numpy()
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            arr = _llama_cpp_permute(arr, cfg.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            arr = _llama_cpp_permute(arr, cfg.num_key_value_heads)
        arr = np.ascontiguousarray(arr)
        if quantize:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)

    with torch.no_grad():
        for name, t in hf_model.state_dict().items():
            if name in _GLOBAL:
                add(_GLOBAL[name], t, name, t.dim() == 2)
                continue
            parts = name.split(".")
            block, rest = f"blk.{parts[2]}", ".".join(parts[3:])
            if rest == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate rows, then up rows
                gate, up = t.chunk(2, dim=1)
                gate_q, up_q = gate.clone(), up.clone()
                add(f"{block}.ffn_gate_exps.weight", gate_q, name, True)
                add(f"{block}.ffn_up_exps.weight", up_q, name, True)
                t.copy_(torch.cat([gate_q, up_q], dim=1))
                continue
            add(f"{block}.{_BLOCK[rest]}", t, name, t.dim() >= 2 and rest != "mlp.gate.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
