"""Tensor-parallel layers (Megatron-LM's split, as vLLM): each TP rank holds a shard of a weight.

- ``ColumnParallelLinear``: rows of the weight (output features) split across ranks; each rank's
  output is its slice of the full output, no collective.
- ``MergedColumnParallelLinear``: a ``MergedLinear`` whose projections are each split: Q/K/V by
  attention heads (``HeadLayout``: KV heads replicated when there are fewer than ranks), gate and
  up by rows; ``split`` then gives this rank's q, k, v (or gate, up).
- ``RowParallelLinear``: columns (input features) split; each rank multiplies its slice of the
  input, the partial products are summed by an all-reduce; the bias lives on TP rank 0 only, so it
  is added once.
- ``VocabParallelEmbedding``: each rank a contiguous vocab range (``ceil(vocab / tp)`` rows, the
  last rank's padded with zero rows); a lookup is masked to the rank's range and all-reduced. As a
  tied lm_head (``project``) the rank's logits are all-gathered and the padding cut, so every
  rank gets the full-vocab logits. ``ParallelLMHead``: the same head, untied.

They are ``Linear`` / ``MergedLinear`` / ``VocabEmbedding`` holding the shard (in/out features,
``output_sizes`` are this rank's), so ``bind_backends`` binds them like any layer and the
LoRA seam (``lora_key``) stays where it is. Loading: ``shard_weight`` cuts a full-model tensor (or
a ``LazyWeight`` that reads only the cut) to this rank's piece; ``full_shape`` is the unsharded
parameter's shape (dummy weights are the shards of the full model's). A GGUF weight that stays
block-quantized turns the layer into its ``quantized_variant`` (``quantized_linear``), which
keeps the parallel behaviour. At ``tp_size == 1`` the factory functions (``column_linear``, ...)
build the plain layers, so a single-rank model is exactly the unsharded one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.distributed.communication import all_gather, all_reduce
from lmserve.distributed.parallel_state import ParallelContext
from lmserve.model.backends.block_formats import BlockQuantizedWeight
from lmserve.model.layers.linear import Linear, MergedLinear, VocabEmbedding
from lmserve.model.layers.quantized_linear import QuantizedEmbedding, QuantizedLinear, QuantizedMergedLinear
from lmserve.model.layers.sharding import Weight, cat_rows, narrow_weight, pad_rows

if TYPE_CHECKING:
    from lmserve.lora.batch import LoRAStepMapping

Shard = torch.Tensor | BlockQuantizedWeight


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({parts})")
    return total // parts


def refuse_tensor_parallel(parallel: ParallelContext | None, architecture: str) -> None:
    """ValueError when a model class that cannot shard is built with ``tp_size > 1``."""
    if parallel is not None and parallel.tp_size > 1:
        raise ValueError(f"{architecture} does not support tensor parallelism (tensor_parallel_size="
                         f"{parallel.tp_size}); use tensor_parallel_size 1, or a model that shards: Llama, "
                         "Mistral, Qwen2, Qwen3, SmolLM2, Phi-3, Gemma 2/3")


@dataclass(frozen=True)
class HeadLayout:
    """This rank's attention heads: query heads [q_start, q_start + num_heads) and KV heads
    [kv_start, kv_start + num_kv_heads). With fewer KV heads than ranks each rank holds the one KV
    head its query heads read (replicated on ``tp_size / total_kv_heads`` ranks), as vLLM does."""

    num_heads: int
    num_kv_heads: int
    q_start: int
    kv_start: int

    @classmethod
    def of(cls, total_heads: int, total_kv_heads: int, parallel: ParallelContext) -> "HeadLayout":
        tp, rank = parallel.tp_size, parallel.tp_rank
        heads = _divide(total_heads, tp, "num_attention_heads")
        if total_kv_heads >= tp:
            kv = _divide(total_kv_heads, tp, "num_key_value_heads")
            return cls(heads, kv, rank * heads, rank * kv)
        if tp % total_kv_heads:
            raise ValueError(f"tensor_parallel_size ({tp}) must be a multiple of num_key_value_heads "
                             f"({total_kv_heads}) when it is larger")
        return cls(heads, 1, rank * heads, rank // (tp // total_kv_heads))


def vocab_range(vocab_size: int, parallel: ParallelContext) -> tuple[int, int, int]:
    """(start, end, rows): this rank's vocab ids [start, end) in a table of ``rows`` =
    ceil(vocab / tp) rows (the rest, on the last rank(s), zero padding)."""
    rows = -(-vocab_size // parallel.tp_size)
    start = min(parallel.tp_rank * rows, vocab_size)
    return start, min(start + rows, vocab_size), rows


class ShardedLayer:
    """What every tensor-parallel layer offers its loader (mixin; see the module docstring)."""

    parallel: ParallelContext
    ctor_kwargs: dict[str, Any]  # the constructor's arguments (to build the quantized variant)
    quantized_variant: type | None = None

    def shard_weight(self, param_name: str, loaded: Weight, shard: str | None = None) -> Shard | None:
        """This rank's piece of the full-model tensor ``loaded`` for parameter ``param_name`` (of
        projection ``shard`` of a merged layer, or of the whole merged parameter when None); None
        when this rank holds no such parameter (a row-parallel bias off rank 0)."""
        raise NotImplementedError

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        """The shape of parameter ``param_name`` in the unsharded model."""
        raise NotImplementedError

    def quantized_copy(self) -> nn.Module:
        """The ``quantized_variant`` of this layer sharing its parameters (``quantized_module_for``)."""
        new = self.quantized_variant(**self.ctor_kwargs)
        new.weight = self.weight
        if isinstance(self, Linear):
            new.bias = self.bias
        return new


class ColumnParallelLinear(ShardedLayer, Linear):
    """Rows [row_start, row_start + out_features) of a [full_out_features, in_features] weight."""

    def __init__(self, in_features: int, out_features: int, parallel: ParallelContext, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        rows = _divide(out_features, parallel.tp_size, "output features")
        super().__init__(in_features, rows, bias=bias, dtype=dtype)
        self.parallel = parallel
        self.ctor_kwargs = dict(in_features=in_features, out_features=out_features, parallel=parallel, bias=bias,
                                dtype=dtype)
        self.full_out_features = out_features
        self.row_start = parallel.tp_rank * rows

    def shard_weight(self, param_name: str, loaded: Weight, shard: str | None = None) -> Shard | None:
        return narrow_weight(loaded, 0, self.row_start, self.out_features, param_name)

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        return (self.full_out_features, self.in_features) if param_name == "weight" else (self.full_out_features,)


class MergedColumnParallelLinear(ShardedLayer, MergedLinear):
    """A merged projection each of whose parts is row-sharded: part ``shard_names[i]`` has
    ``full_output_sizes[i]`` rows in the checkpoint, of which this rank holds
    ``row_ranges[i] = (start, rows)``. ``qkv`` and ``gate_up`` build the usual two."""

    def __init__(self, in_features: int, full_output_sizes: Sequence[int], shard_names: Sequence[str],
                 row_ranges: Sequence[tuple[int, int]], parallel: ParallelContext, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, [rows for _, rows in row_ranges], shard_names, bias=bias, dtype=dtype)
        self.parallel = parallel
        self.ctor_kwargs = dict(in_features=in_features, full_output_sizes=list(full_output_sizes),
                                shard_names=list(shard_names), row_ranges=list(row_ranges), parallel=parallel,
                                bias=bias, dtype=dtype)
        self.full_output_sizes = list(full_output_sizes)
        self.row_ranges = [tuple(r) for r in row_ranges]

    @classmethod
    def qkv(cls, hidden: int, total_heads: int, total_kv_heads: int, head_dim: int, parallel: ParallelContext,
            bias: bool = False, dtype: torch.dtype | None = None) -> "MergedColumnParallelLinear":
        """Q|K|V of attention split by heads (``HeadLayout``)."""
        heads = HeadLayout.of(total_heads, total_kv_heads, parallel)
        ranges = [(heads.q_start * head_dim, heads.num_heads * head_dim),
                  (heads.kv_start * head_dim, heads.num_kv_heads * head_dim),
                  (heads.kv_start * head_dim, heads.num_kv_heads * head_dim)]
        full = [total_heads * head_dim, total_kv_heads * head_dim, total_kv_heads * head_dim]
        return cls(hidden, full, ["q", "k", "v"], ranges, parallel, bias=bias, dtype=dtype)

    @classmethod
    def gate_up(cls, hidden: int, intermediate: int, parallel: ParallelContext, bias: bool = False,
                dtype: torch.dtype | None = None) -> "MergedColumnParallelLinear":
        rows = _divide(intermediate, parallel.tp_size, "intermediate_size")
        ranges = [(parallel.tp_rank * rows, rows)] * 2
        return cls(hidden, [intermediate, intermediate], ["gate", "up"], ranges, parallel, bias=bias, dtype=dtype)

    def shard_weight(self, param_name: str, loaded: Weight, shard: str | None = None) -> Shard | None:
        if shard is not None:
            start, rows = self.row_ranges[self.shard_names.index(shard)]
            return narrow_weight(loaded, 0, start, rows, f"{shard}.{param_name}")
        parts, offset = [], 0  # the whole merged parameter: each part's rows, in order
        for full, (start, rows), name in zip(self.full_output_sizes, self.row_ranges, self.shard_names, strict=True):
            parts.append(narrow_weight(loaded, 0, offset + start, rows, f"{name}.{param_name}"))
            offset += full
        return cat_rows(parts)

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        rows = sum(self.full_output_sizes)
        return (rows, self.in_features) if param_name == "weight" else (rows,)


class RowParallelLinear(ShardedLayer, Linear):
    """Columns [col_start, col_start + in_features) of a [out_features, full_in_features] weight;
    ``forward`` takes this rank's slice of the input and returns the full (all-reduced) output.
    The bias is a parameter of TP rank 0 only (``has_bias`` says whether the layer has one)."""

    def __init__(self, in_features: int, out_features: int, parallel: ParallelContext, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        cols = _divide(in_features, parallel.tp_size, "input features")
        super().__init__(cols, out_features, bias=bias and parallel.tp_rank == 0, dtype=dtype)
        self.parallel = parallel
        self.ctor_kwargs = dict(in_features=in_features, out_features=out_features, parallel=parallel, bias=bias,
                                dtype=dtype)
        self.has_bias = bias
        self.full_in_features = in_features
        self.col_start = parallel.tp_rank * cols

    def forward(self, x: torch.Tensor, decode_only: bool = False, lora: LoRAStepMapping | None = None
                ) -> torch.Tensor:
        return all_reduce(super().forward(x, decode_only, lora), self.parallel)

    def shard_weight(self, param_name: str, loaded: Weight, shard: str | None = None) -> Shard | None:
        if param_name == "bias":
            return narrow_weight(loaded, 0, 0, self.out_features) if self.parallel.tp_rank == 0 else None
        return narrow_weight(loaded, 1, self.col_start, self.in_features, param_name)

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        return (self.out_features, self.full_in_features) if param_name == "weight" else (self.out_features,)


class VocabParallelEmbedding(ShardedLayer, VocabEmbedding):
    """Vocab ids [vocab_start, vocab_end) of the table, in ``num_embeddings`` rows (see
    ``vocab_range``); ``forward`` and ``project`` return full results on every rank."""

    def __init__(self, num_embeddings: int, embedding_dim: int, parallel: ParallelContext,
                 dtype: torch.dtype | None = None) -> None:
        start, end, rows = vocab_range(num_embeddings, parallel)
        super().__init__(rows, embedding_dim, dtype=dtype)
        self.parallel = parallel
        self.ctor_kwargs = dict(num_embeddings=num_embeddings, embedding_dim=embedding_dim, parallel=parallel,
                                dtype=dtype)
        self.full_num_embeddings = num_embeddings
        self.vocab_start, self.vocab_end = start, end

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_end - self.vocab_start)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0), self.parallel)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = all_gather(self.head_backend.apply(self, hidden, True), self.parallel, dim=-1)
        return logits[..., :self.full_num_embeddings]

    def shard_weight(self, param_name: str, loaded: Weight, shard: str | None = None) -> Shard | None:
        piece = narrow_weight(loaded, 0, self.vocab_start, self.vocab_end - self.vocab_start, param_name)
        return pad_rows(piece, self.num_embeddings)

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        return (self.full_num_embeddings, self.embedding_dim)


class ParallelLMHead(ShardedLayer, Linear):
    """An untied lm_head split by vocab as ``VocabParallelEmbedding``; ``forward`` returns the
    full-vocab logits (all-gathered, padding cut) on every rank."""

    def __init__(self, in_features: int, vocab_size: int, parallel: ParallelContext,
                 dtype: torch.dtype | None = None) -> None:
        start, end, rows = vocab_range(vocab_size, parallel)
        super().__init__(in_features, rows, bias=False, dtype=dtype)
        self.parallel = parallel
        self.ctor_kwargs = dict(in_features=in_features, vocab_size=vocab_size, parallel=parallel, dtype=dtype)
        self.full_vocab_size = vocab_size
        self.vocab_start, self.vocab_end = start, end

    def forward(self, x: torch.Tensor, decode_only: bool = False, lora: LoRAStepMapping | None = None
                ) -> torch.Tensor:
        logits = all_gather(super().forward(x, decode_only, lora), self.parallel, dim=-1)
        return logits[..., :self.full_vocab_size]

    def shard_weight(self, param_name: str, loaded: Weight, shard: str | None = None) -> Shard | None:
        piece = narrow_weight(loaded, 0, self.vocab_start, self.vocab_end - self.vocab_start, param_name)
        return pad_rows(piece, self.out_features)

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        return (self.full_vocab_size, self.in_features)


# The same layers once a GGUF weight arrived block-quantized for them (``quantized_module_for``).
class QuantizedColumnParallelLinear(ColumnParallelLinear, QuantizedLinear):
    pass


class QuantizedMergedColumnParallelLinear(MergedColumnParallelLinear, QuantizedMergedLinear):
    pass


class QuantizedRowParallelLinear(RowParallelLinear, QuantizedLinear):
    pass


class QuantizedVocabParallelEmbedding(VocabParallelEmbedding, QuantizedEmbedding):
    pass


class QuantizedParallelLMHead(ParallelLMHead, QuantizedLinear):
    pass


ColumnParallelLinear.quantized_variant = QuantizedColumnParallelLinear
MergedColumnParallelLinear.quantized_variant = QuantizedMergedColumnParallelLinear
RowParallelLinear.quantized_variant = QuantizedRowParallelLinear
VocabParallelEmbedding.quantized_variant = QuantizedVocabParallelEmbedding
ParallelLMHead.quantized_variant = QuantizedParallelLMHead


# Factories: the plain layer at tp_size 1, the parallel one above it.
def _sharded(parallel: ParallelContext | None) -> bool:
    return parallel is not None and parallel.tp_size > 1


def column_linear(in_features: int, out_features: int, parallel: ParallelContext | None, bias: bool = False,
                  dtype: torch.dtype | None = None) -> Linear:
    if _sharded(parallel):
        return ColumnParallelLinear(in_features, out_features, parallel, bias=bias, dtype=dtype)
    return Linear(in_features, out_features, bias=bias, dtype=dtype)


def row_linear(in_features: int, out_features: int, parallel: ParallelContext | None, bias: bool = False,
               dtype: torch.dtype | None = None) -> Linear:
    if _sharded(parallel):
        return RowParallelLinear(in_features, out_features, parallel, bias=bias, dtype=dtype)
    return Linear(in_features, out_features, bias=bias, dtype=dtype)


def qkv_linear(hidden: int, total_heads: int, total_kv_heads: int, head_dim: int, parallel: ParallelContext | None,
               bias: bool = False, dtype: torch.dtype | None = None) -> MergedLinear:
    if _sharded(parallel):
        return MergedColumnParallelLinear.qkv(hidden, total_heads, total_kv_heads, head_dim, parallel, bias=bias,
                                              dtype=dtype)
    q, kv = total_heads * head_dim, total_kv_heads * head_dim
    return MergedLinear(hidden, [q, kv, kv], ["q", "k", "v"], bias=bias, dtype=dtype)


def gate_up_linear(hidden: int, intermediate: int, parallel: ParallelContext | None, bias: bool = False,
                   dtype: torch.dtype | None = None) -> MergedLinear:
    if _sharded(parallel):
        return MergedColumnParallelLinear.gate_up(hidden, intermediate, parallel, bias=bias, dtype=dtype)
    return MergedLinear(hidden, [intermediate, intermediate], ["gate", "up"], bias=bias, dtype=dtype)


def vocab_embedding(vocab_size: int, hidden: int, parallel: ParallelContext | None,
                    dtype: torch.dtype | None = None) -> VocabEmbedding:
    if _sharded(parallel):
        return VocabParallelEmbedding(vocab_size, hidden, parallel, dtype=dtype)
    return VocabEmbedding(vocab_size, hidden, dtype=dtype)


def lm_head(hidden: int, vocab_size: int, parallel: ParallelContext | None, dtype: torch.dtype | None = None
            ) -> Linear:
    if _sharded(parallel):
        return ParallelLMHead(hidden, vocab_size, parallel, dtype=dtype)
    return Linear(hidden, vocab_size, bias=False, dtype=dtype)


def head_layout(total_heads: int, total_kv_heads: int, parallel: ParallelContext | None) -> HeadLayout:
    """This rank's heads (all of them at tp_size 1)."""
    if _sharded(parallel):
        return HeadLayout.of(total_heads, total_kv_heads, parallel)
    return HeadLayout(total_heads, total_kv_heads, 0, 0)
