"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``, ``GPTNeoXForSequenceClassification``): LayerNorm
blocks with a parallel residual (``use_parallel_residual``: ``x + attn(ln1(x)) + mlp(ln2(x))``,
else sequential), RoPE over the first ``rotary_pct`` of each head, a fused ``query_key_value``
whose rows are interleaved per head ([H, (q, k, v), D]; regrouped to [Q; K; V] at load), and an
untied ``embed_out`` head.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.linear import VocabEmbedding
from lmserve.model.layers.rotary import RotaryEmbedding, RotaryInputs
from lmserve.model.models.decoder_base import (DecoderAttention, DecoderForCausalLM, DecoderModelBase, PlainMLP,
                                               Weight, fused_qkv, layer_norm, sequence_classifier)

_LAYER_NAMES = {"attention.dense": "self_attn.o_proj", "mlp.dense_h_to_4h": "mlp.fc_in",
                "mlp.dense_4h_to_h": "mlp.fc_out"}
_IGNORED = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
        bias = bool(getattr(config, "attention_bias", True))
        self.parallel = bool(config.use_parallel_residual)
        self.input_layernorm = layer_norm(hidden, eps, dtype)
        self.post_attention_layernorm = layer_norm(hidden, eps, dtype)
        self.self_attn = DecoderAttention(hidden, heads, heads, hidden // heads, dtype, qkv_bias=bias, o_bias=bias,
                                          scale=(hidden // heads) ** -0.5)
        self.mlp = PlainMLP(hidden, config.intermediate_size, config.hidden_act, dtype)

    def forward(self, hidden: torch.Tensor, rope: RotaryInputs, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(hidden), rope, kv_cache, meta)
        if self.parallel:
            return self.mlp(self.post_attention_layernorm(hidden), meta.decode_only) + attn + hidden
        attn = attn + hidden
        return self.mlp(self.post_attention_layernorm(attn), meta.decode_only) + attn


class GPTNeoXModel(DecoderModelBase):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, dtype) for _ in range(config.num_hidden_layers))
        self.norm = layer_norm(config.hidden_size, config.layer_norm_eps, dtype)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding.from_config(config, head_dim, dtype, allow_partial=True)
        self.max_position = self.rotary_emb.max_position

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.inputs_for(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, rope, kv_cache, meta)
        return self.norm(hidden)


class GPTNeoXForCausalLM(DecoderForCausalLM):
    """GPT-NeoX causal LM (module docstring); the head is ``embed_out``."""

    model_class = GPTNeoXModel

    def rename_weight(self, name: str, tensor: Weight) -> Iterable[tuple[str, Weight]]:
        if name.endswith(_IGNORED):
            return []
        if name == "embed_out.weight":
            return [("lm_head.weight", tensor)]
        rest = name.removeprefix("gpt_neox.")
        parts = rest.split(".")
        if parts[0] in ("embed_in", "final_layer_norm") and len(parts) == 2:
            return [(f"model.{'embed_tokens' if parts[0] == 'embed_in' else 'norm'}.{parts[1]}", tensor)]
        if parts[0] != "layers" or len(parts) < 4:
            return [(name, tensor)]  # reported as unexpected by the loader
        prefix, module, suffix = f"model.layers.{parts[1]}", ".".join(parts[2:-1]), parts[-1]
        if module == "attention.query_key_value":
            heads = self.config.num_attention_heads
            head_dim = self.config.hidden_size // heads
            # [H, 3, D, ...] rows -> [3, H, D, ...]: Q rows, then K, then V
            grouped = tensor.reshape(heads, 3, head_dim, *tensor.shape[1:]).transpose(0, 1)
            grouped = grouped.reshape(tensor.shape).contiguous()
            return list(fused_qkv(f"{prefix}.self_attn", suffix, grouped, [heads * head_dim] * 3))
        return [(f"{prefix}.{_LAYER_NAMES.get(module, module)}.{suffix}", tensor)]


GPTNeoXForSequenceClassification = sequence_classifier(GPTNeoXForCausalLM)
