"""OPT (``OPTForCausalLM``, ``OPTForSequenceClassification``): learned positions looked up at
``position + 2`` (the checkpoint's table has 2 extra rows), LayerNorm blocks either pre-norm
(``do_layer_norm_before``, most sizes) or post-norm (opt-350m), ReLU MLP, and ``project_in`` /
``project_out`` when ``word_embed_proj_dim`` differs from ``hidden_size`` (the token embeddings
and the tied lm_head are then ``word_embed_proj_dim`` wide).

Checkpoint names ``model.decoder.*`` (or ``decoder.*`` in old ones) map onto the internal names
of ``decoder_base``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.linear import Linear, VocabEmbedding
from lmserve.model.models.decoder_base import (DecoderAttention, DecoderForCausalLM, DecoderModelBase, PlainMLP,
                                               Weight, layer_norm, sequence_classifier)

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding's offset
_LAYER_NAMES = {"self_attn.out_proj": "self_attn.o_proj", "self_attn_layer_norm": "input_layernorm",
                "final_layer_norm": "post_attention_layernorm", "fc1": "mlp.fc_in", "fc2": "mlp.fc_out"}
_TOP_NAMES = {"embed_tokens": "embed_tokens", "embed_positions": "embed_positions", "project_in": "project_in",
              "project_out": "project_out", "final_layer_norm": "norm"}


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        bias = bool(getattr(config, "enable_bias", True))
        affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
        self.pre_norm = bool(config.do_layer_norm_before)
        self.self_attn = DecoderAttention(hidden, heads, heads, hidden // heads, dtype, qkv_bias=bias, o_bias=bias,
                                          scale=(hidden // heads) ** -0.5)
        self.input_layernorm = layer_norm(hidden, 1e-5, dtype, affine=affine, bias=affine)
        self.post_attention_layernorm = layer_norm(hidden, 1e-5, dtype, affine=affine, bias=affine)
        self.mlp = PlainMLP(hidden, config.ffn_dim, config.activation_function, dtype, bias=bias)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.pre_norm:
            hidden = hidden + self.self_attn(self.input_layernorm(hidden), None, kv_cache, meta)
            return hidden + self.mlp(self.post_attention_layernorm(hidden), meta.decode_only)
        hidden = self.input_layernorm(hidden + self.self_attn(hidden, None, kv_cache, meta))
        return self.post_attention_layernorm(hidden + self.mlp(hidden, meta.decode_only))


class OPTModel(DecoderModelBase):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, proj = config.hidden_size, config.word_embed_proj_dim
        self.max_position = int(config.max_position_embeddings)
        self.embed_tokens = VocabEmbedding(config.vocab_size, proj, dtype=dtype)
        self.embed_positions = VocabEmbedding(self.max_position + POSITION_OFFSET, hidden, dtype=dtype)
        self.project_in = Linear(proj, hidden, dtype=dtype) if proj != hidden else None
        self.project_out = Linear(hidden, proj, dtype=dtype) if proj != hidden else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, dtype) for _ in range(config.num_hidden_layers))
        affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
        final = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.norm = layer_norm(hidden, 1e-5, dtype, affine=affine, bias=affine) if final else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden, meta.decode_only)
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, meta)
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden, meta.decode_only)
        return hidden


class OPTForCausalLM(DecoderForCausalLM):
    """OPT causal LM (module docstring); the lm_head reads ``word_embed_proj_dim`` features."""

    model_class = OPTModel

    @staticmethod
    def hidden_out(config: Any) -> int:
        return config.word_embed_proj_dim

    def rename_weight(self, name: str, tensor: Weight) -> Iterable[tuple[str, Weight]]:
        if name.startswith("lm_head."):
            return [(name, tensor)]
        rest = name.removeprefix("model.").removeprefix("decoder.")
        parts = rest.split(".")
        if parts[0] in _TOP_NAMES and len(parts) == 2:
            return [(f"model.{_TOP_NAMES[parts[0]]}.{parts[1]}", tensor)]
        if parts[0] == "layers" and len(parts) >= 4:
            module = ".".join(parts[2:-1])
            module = _LAYER_NAMES.get(module, module)
            return [(f"model.layers.{parts[1]}.{module}.{parts[-1]}", tensor)]
        return [(name, tensor)]  # reported as unexpected by the loader


OPTForSequenceClassification = sequence_classifier(OPTForCausalLM)
