"""The MoE parts of a GGUF file's config that transformers' GGUF config reader leaves out.

- llama.cpp exports Mixtral as architecture "llama" with ``llama.expert_count``: such a file
  becomes a ``MixtralConfig`` (``architectures`` ["MixtralForCausalLM"]); the experts' size is
  ``expert_feed_forward_length`` if given, else ``feed_forward_length``.
- "qwen3moe": ``moe_intermediate_size`` from ``expert_feed_forward_length`` (transformers keeps
  Qwen3MoeConfig's default), and ``mlp_only_layers`` from the blocks that have no router tensor
  (``ffn_gate_inp``), ``decoder_sparse_step`` 1. A shared expert (``expert_shared_count``) is
  refused: Qwen3-MoE has none, and a file that has one is another architecture.
Every other config is returned unchanged.
"""

from __future__ import annotations

from typing import Any


def moe_gguf_config(config: Any, arch: str, meta: dict[str, Any], tensor_names: list[str]) -> Any:
    """``config`` (from transformers' GGUF reader) with the MoE fields of the module docstring;
    ``meta``: the file's ``{arch}.*`` metadata without the prefix; ``tensor_names``: its tensors."""
    experts = int(meta.get("expert_count") or 0)
    if experts <= 0:
        return config
    if int(meta.get("expert_shared_count") or 0) > 0:
        raise ValueError(f"GGUF architecture {arch!r} with shared experts is not supported "
                         "(supported mixture-of-experts models: Mixtral, Qwen3-MoE)")
    expert_ffn = int(meta.get("expert_feed_forward_length") or meta.get("feed_forward_length") or 0)
    if arch == "llama":
        from transformers import MixtralConfig

        keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id", "head_dim")
        fields = {k: getattr(config, k) for k in keep if getattr(config, k, None) is not None}
        rope = getattr(config, "rope_parameters", None)
        if rope is not None:
            fields["rope_parameters"] = dict(rope)
        elif getattr(config, "rope_theta", None) is not None:  # transformers 4
            fields["rope_theta"] = config.rope_theta
        mixtral = MixtralConfig(intermediate_size=expert_ffn or config.intermediate_size, num_local_experts=experts,
                                num_experts_per_tok=int(meta.get("expert_used_count") or 2), sliding_window=None,
                                **fields)
        mixtral.architectures = ["MixtralForCausalLM"]
        return mixtral
    if arch == "qwen3moe":
        if expert_ffn:
            config.moe_intermediate_size = expert_ffn
        config.num_experts = experts
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [i for i in range(int(config.num_hidden_layers))
                                  if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names]
        return config
    raise ValueError(f"GGUF architecture {arch!r} with {experts} experts is not supported "
                     "(supported mixture-of-experts models: Mixtral as 'llama', 'qwen3moe')")
