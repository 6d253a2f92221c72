"""Gemma 2 (``Gemma2ForCausalLM``, ``Gemma2ForSequenceClassification``); Gemma 3 text reuses it
(``gemma3.py``).

What differs from Llama, all read from the config:
- token embeddings scaled by ``sqrt(hidden_size)`` (rounded to the model dtype, as HF does);
- RMSNorm weights are stored as ``w`` and applied as ``(1 + w)``: ``1`` is added at load, so the
  layers are the ordinary ``RMSNorm`` (in fp32 exactly HF's; in 16-bit dtypes ``1 + w`` is rounded
  once instead of being computed in fp32 per call);
- four norms per block: input / post-attention / pre-feed-forward / post-feed-forward, the residual
  added after the post-norms;
- attention scale ``query_pre_attn_scalar ** -0.5``; ``attn_logit_softcapping`` caps scores (the
  torch attention backend then runs those layers) and ``final_logit_softcapping`` the logits;
- sliding-window layers interleaved with global ones (``layer_types``); GELU-tanh gated MLP.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmserve.distributed.parallel_state import ParallelContext
from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.parallel_linear import vocab_embedding
from lmserve.model.layers.norm import RMSNorm
from lmserve.model.layers.rotary import RotaryEmbedding, RotaryInputs
from lmserve.model.models.decoder_base import (DecoderAttention, DecoderForCausalLM, DecoderModelBase, GatedMLP,
                                               Weight, sequence_classifier)
from lmserve.model.layers.sharding import materialize
from lmserve.model.models.llama import _head_dim, _sliding_window

_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm", "q_norm", "k_norm")


def layer_type(config: Any, layer_idx: int) -> str:
    """``"sliding_attention"`` or ``"full_attention"`` for layer ``layer_idx``."""
    return "sliding_attention" if _sliding_window(config, layer_idx) else "full_attention"


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype, qk_norm: bool,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = DecoderAttention(
            hidden, config.num_attention_heads, config.num_key_value_heads, _head_dim(config), dtype,
            qkv_bias=bool(config.attention_bias), o_bias=bool(config.attention_bias),
            scale=float(config.query_pre_attn_scalar) ** -0.5, sliding_window=_sliding_window(config, layer_idx),
            logits_soft_cap=getattr(config, "attn_logit_softcapping", None), qk_norm_eps=eps if qk_norm else None,
            parallel=parallel)
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        self.mlp = GatedMLP(hidden, config.intermediate_size, act, dtype, parallel=parallel)
        self.input_layernorm = RMSNorm(hidden, eps=eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps, dtype=dtype)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps=eps, dtype=dtype)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps=eps, dtype=dtype)
        self.layer_type = layer_type(config, layer_idx)

    def forward(self, hidden: torch.Tensor, rope: RotaryInputs, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(hidden), rope, kv_cache, meta)
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden), meta.decode_only)
        return hidden + self.post_feedforward_layernorm(mlp)


class GemmaModel(DecoderModelBase):
    """Gemma 2 (``qk_norm`` False, one RoPE) or Gemma 3 text (``qk_norm``, one RoPE per layer type:
    its sliding layers use the local base frequency)."""

    qk_norm = False

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size, parallel, dtype=dtype)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i, dtype, self.qk_norm, parallel)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.embed_scale = float(config.hidden_size) ** 0.5
        types = sorted({layer.layer_type for layer in self.layers})
        # Gemma 3's config has rope_parameters per layer type, Gemma 2's one set (used for both)
        self.rotary = nn.ModuleDict({t: RotaryEmbedding.from_config(config, _head_dim(config), dtype, layer_type=t)
                                     for t in types})
        self.max_position = min(r.max_position for r in self.rotary.values())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        ropes = {t: r.inputs_for(positions) for t, r in self.rotary.items()}
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, ropes[layer.layer_type], kv_cache, meta)
        return self.norm(hidden)


class Gemma2ForCausalLM(DecoderForCausalLM):
    """Gemma 2 causal LM (module docstring). Checkpoint names are HF's (``model.layers.N.*``)."""

    model_class = GemmaModel
    supports_tensor_parallel = True

    def rename_weight(self, name: str, tensor: Weight) -> Iterable[tuple[str, Weight]]:
        if name.endswith(".weight") and name.split(".")[-2] in _NORMS + ("norm",):
            tensor = materialize(tensor).float() + 1.0  # Gemma's (1 + w) norm weight
        return [(name, tensor)]


Gemma2ForSequenceClassification = sequence_classifier(Gemma2ForCausalLM)
