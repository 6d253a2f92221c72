"""GPT-2 (``GPT2LMHeadModel``, ``GPT2ForSequenceClassification``): learned absolute positions,
pre-LayerNorm blocks, fused c_attn, gelu_new MLP, lm_head tied to the token embeddings.

Checkpoints store the projections as ``Conv1D`` weights [in, out]: they are transposed at load.
Names come with or without the ``transformer.`` prefix (old checkpoints have none); the
``attn.bias`` / ``attn.masked_bias`` mask buffers are not weights. GGUF files (llama.cpp's
``gpt2``) arrive already renamed to internal names in torch layout (``gguf_loader``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.linear import VocabEmbedding
from lmserve.model.models.decoder_base import (DecoderAttention, DecoderForCausalLM, DecoderModelBase, PlainMLP,
                                               Weight, fused_qkv, layer_norm, sequence_classifier)

_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_BLOCK = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
          "mlp.c_fc": "mlp.fc_in", "mlp.c_proj": "mlp.fc_out"}
_LAYER_RE = re.compile(r"^h\.(\d+)\.(.+)\.(weight|bias)$")


class GPT2Block(nn.Module):
    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        scale = head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        eps = config.layer_norm_epsilon
        self.input_layernorm = layer_norm(hidden, eps, dtype)
        self.self_attn = DecoderAttention(hidden, heads, heads, head_dim, dtype, qkv_bias=True, o_bias=True,
                                          scale=scale)
        self.post_attention_layernorm = layer_norm(hidden, eps, dtype)
        inter = getattr(config, "n_inner", None) or 4 * hidden
        self.mlp = PlainMLP(hidden, inter, config.activation_function, dtype)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), None, kv_cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden), meta.decode_only)


class GPT2Model(DecoderModelBase):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.max_position = int(config.n_positions)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.embed_positions = VocabEmbedding(self.max_position, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(GPT2Block(config, i, dtype) for i in range(config.num_hidden_layers))
        self.norm = layer_norm(config.hidden_size, config.layer_norm_epsilon, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) + self.embed_positions(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, meta)
        return self.norm(hidden)


class GPT2LMHeadModel(DecoderForCausalLM):
    """GPT-2 causal LM (module docstring)."""

    model_class = GPT2Model

    def rename_weight(self, name: str, tensor: Weight) -> Iterable[tuple[str, Weight]]:
        if name.startswith(("model.", "lm_head.")):  # internal names (GGUF) and the head
            return [(name, tensor)]
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return []  # the causal-mask buffers of old checkpoints
        if name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
            internal = {"wte": "model.embed_tokens", "wpe": "model.embed_positions", "ln_f": "model.norm"}
            stem, suffix = name.split(".")
            return [(f"{internal[stem]}.{suffix}", tensor)]
        m = _LAYER_RE.match(name)
        if m is None:
            return [(name, tensor)]  # reported as unexpected by the loader
        layer, module, suffix = m.groups()
        if module in _CONV1D and suffix == "weight":
            tensor = tensor.t().contiguous()  # Conv1D [in, out] -> [out, in]
        prefix = f"model.layers.{layer}"
        if module == "attn.c_attn":
            hidden = self.config.hidden_size
            return list(fused_qkv(f"{prefix}.self_attn", suffix, tensor, [hidden] * 3))
        if module not in _BLOCK:
            return [(name, tensor)]
        return [(f"{prefix}.{_BLOCK[module]}.{suffix}", tensor)]


GPT2ForSequenceClassification = sequence_classifier(GPT2LMHeadModel)
