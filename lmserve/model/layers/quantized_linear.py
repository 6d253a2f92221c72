"""Layers whose weight arrived in a llama.cpp block format (GGUF Q4_0, Q4_1, Q8_0) and stays
quantized: ``QuantizedLinear``, ``QuantizedMergedLinear``, ``QuantizedEmbedding``.

They are the plain layers plus the blocks: loading puts the dequantized weight (exact, bit-equal
to ``gguf.quants.dequantize``) into ``weight`` and keeps the ``BlockQuantizedWeight`` in
``blocks`` until the backends are bound, when the plan packs it for an integer kernel
(``model/backends/quantized.py``: ``BlockQuantLinear``, the integer kernel for few rows and a
dense backend for the rest) and ``blocks`` is dropped. A loader swaps a layer for its quantized
counterpart (``quantized_module_for``) when a block-quantized tensor arrives for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmserve.model.backends.block_formats import BlockQuantizedWeight
from lmserve.model.layers.linear import Linear, MergedLinear, VocabEmbedding


def _load_dequantized(weight: torch.Tensor, loaded: BlockQuantizedWeight, name: str) -> None:
    """Copy ``loaded`` dequantized into ``weight``."""
    if tuple(loaded.shape) != tuple(weight.shape):
        raise ValueError(f"{name}: checkpoint shape {loaded.shape} != model shape {tuple(weight.shape)}")
    with torch.no_grad():
        weight.copy_(loaded.dequantize())


class QuantizedLinear(Linear):
    """A ``Linear`` whose weight arrived block-quantized (see the module docstring). ``blocks``:
    the file's blocks until the backends are bound (None before ``load_quantized`` and after)."""

    blocks: list[BlockQuantizedWeight] | None

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.blocks = None

    @classmethod
    def from_linear(cls, linear: Linear) -> "QuantizedLinear":
        """Same shape, sharing ``linear``'s weight and bias Parameters (so what is loaded stays)."""
        new = cls(linear.in_features, linear.out_features, bias=False, dtype=linear.weight.dtype)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def load_quantized(self, loaded: BlockQuantizedWeight, name: str = "weight") -> None:
        _load_dequantized(self.weight, loaded, name)
        self.blocks = [loaded]


class QuantizedMergedLinear(MergedLinear):
    """A ``MergedLinear`` whose shards may arrive block-quantized: the dequantized rows go into
    ``weight`` at once; ``blocks`` holds every shard's blocks, in order, once all have arrived
    quantized (None if any arrived dense: the layer then stays dense). ``split`` is unchanged."""

    blocks: list[BlockQuantizedWeight] | None

    def __init__(self, in_features: int, output_sizes: Sequence[int], shard_names: Sequence[str],
                 bias: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, output_sizes, shard_names, bias=bias, dtype=dtype)
        self.blocks = None
        self._pending: dict[str, BlockQuantizedWeight | None] = {}  # shard -> blocks (None: dense)

    @classmethod
    def from_merged(cls, merged: MergedLinear) -> "QuantizedMergedLinear":
        """Same shards, sharing ``merged``'s weight and bias Parameters."""
        new = cls(merged.in_features, merged.output_sizes, merged.shard_names, bias=False,
                  dtype=merged.weight.dtype)
        new.weight, new.bias = merged.weight, merged.bias
        return new

    def load_shard(self, param_name: str, shard: str, loaded: torch.Tensor | BlockQuantizedWeight) -> None:
        quantized = isinstance(loaded, BlockQuantizedWeight)
        if param_name == "weight":
            self._pending[shard] = loaded if quantized else None
        super().load_shard(param_name, shard, loaded.dequantize() if quantized else loaded)
        if param_name == "weight" and len(self._pending) == len(self.shard_names):
            parts = [self._pending[s] for s in self.shard_names]
            self.blocks = None if any(p is None for p in parts) else parts
            self._pending = {}

    def load_quantized(self, loaded: BlockQuantizedWeight, name: str = "weight") -> None:
        """All shards at once: a checkpoint that stores them fused (GGUF ``attn_qkv`` of GPT-2
        and Phi-3, Phi-3's ``ffn_up`` holding gate|up), rows in shard order."""
        _load_dequantized(self.weight, loaded, name)
        self.blocks = [loaded]
        self._pending = {}


class QuantizedEmbedding(VocabEmbedding):
    """A token embedding whose table arrived block-quantized. Lookups read ``weight`` (the
    dequantized table in the model dtype, exact); ``project`` (the tied lm_head) runs through
    ``head_backend``, an integer kernel for few rows once bound."""

    blocks: list[BlockQuantizedWeight] | None

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype=dtype)
        self.blocks = None

    @classmethod
    def from_embedding(cls, emb: VocabEmbedding) -> "QuantizedEmbedding":
        new = cls(emb.num_embeddings, emb.embedding_dim, dtype=emb.weight.dtype)
        new.weight = emb.weight
        return new

    def load_quantized(self, loaded: BlockQuantizedWeight, name: str = "weight") -> None:
        _load_dequantized(self.weight, loaded, name)
        self.blocks = [loaded]


def quantized_module_for(module: nn.Module) -> nn.Module | None:
    """The quantized counterpart of a ``Linear``/``MergedLinear``/``VocabEmbedding`` (sharing its
    parameters; for a tensor-parallel layer, its ``quantized_variant``), the module itself if it
    already is one, or None for other modules."""
    if isinstance(module, (QuantizedLinear, QuantizedMergedLinear, QuantizedEmbedding)):
        return module
    if hasattr(module, "quantized_copy"):  # a tensor-parallel layer (``parallel_linear``)
        return module.quantized_copy()
    if isinstance(module, MergedLinear):
        return QuantizedMergedLinear.from_merged(module)
    if isinstance(module, Linear):
        return QuantizedLinear.from_linear(module)
    if isinstance(module, VocabEmbedding):
        return QuantizedEmbedding.from_embedding(module)
    return None
