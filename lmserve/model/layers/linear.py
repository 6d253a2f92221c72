"""Linear layers (single device for now; the TP-sharded variants will keep these interfaces).

``MergedLinear`` stacks several projections that read the same input (Q|K|V, gate|up) into
one matmul; checkpoints still hold them separately, so it loads them shard by shard.

Every layer computes through its ``backend`` (``model/backends/linear.py``): ``TorchLinear`` when
built, the plan's choice once the model is loaded (``loader/binding.py``). The layer is the seam
for LoRA (a delta added to ``forward``'s result) and tensor parallelism (a layer holding a shard
of the weight, with a collective after ``forward``); the backend only computes the matmul.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.backends.linear import LinearBackend, TorchLinear

if TYPE_CHECKING:
    from lmserve.lora.batch import LoRAStepMapping


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """param.copy_(loaded) with a clear error on a shape mismatch (dtype/device are converted)."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(loaded.shape)} != model shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(loaded)


class Linear(nn.Module):
    """y = x @ weight.T + bias; weight [out_features, in_features] (torch/HF layout). Parameters are
    allocated uninitialized: they are meant to be loaded (or dummy-initialized) right after.
    ``backend`` computes it (see the module docstring); a backend that packs the weight leaves
    ``weight`` an empty Parameter (``dense_weight()`` still gives it)."""

    backend: LinearBackend
    # The module's name for LoRA adapters (``lmserve/lora``), set when the engine enables LoRA and
    # the layer is a projection adapters may target; None: adapters never touch it.
    lora_key: str | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.backend = TorchLinear()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"backend={self.backend.name}"

    def forward(self, x: torch.Tensor, decode_only: bool = False, lora: LoRAStepMapping | None = None
                ) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]. ``decode_only``: the step has no prompt
        token (``AttentionMetadata.decode_only``); a block-quantized backend may then use its
        few-row kernel, the others ignore it. ``lora``: the step's adapters
        (``AttentionMetadata.lora``); their deltas are added to whatever the backend computed,
        so every backend (dense, packed, block-quantized) takes adapters the same way."""
        y = self.backend.apply(self, x, decode_only)
        if lora is not None and self.lora_key is not None:
            y = lora.add_delta(self.lora_key, x, y)
        return y

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``F.gelu(forward(x))`` (erf GELU) for a layer no LoRA adapter targets; the backend may
        fuse the activation into its matmul (``LinearBackend.apply_gelu``)."""
        if self.lora_key is not None:
            raise ValueError("forward_gelu is for layers without LoRA adapters")
        return self.backend.apply_gelu(self, x)

    def dense_weight(self) -> torch.Tensor:
        """The weight [out_features, in_features] as a plain tensor (a copy when packed)."""
        return self.backend.dense_weight(self)


class MergedLinear(Linear):
    """Several projections of one input, concatenated along the output dimension.

    ``shard_names[i]`` has ``output_sizes[i]`` rows, in order; ``forward`` returns all of them
    concatenated, and ``split(y)`` cuts them apart again.
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], shard_names: Sequence[str],
                 bias: bool = False, dtype: torch.dtype | None = None) -> None:
        if len(output_sizes) != len(shard_names):
            raise ValueError("output_sizes and shard_names must have the same length")
        super().__init__(in_features, sum(output_sizes), bias=bias, dtype=dtype)
        self.output_sizes = list(output_sizes)
        self.shard_names = list(shard_names)

    def shard_range(self, shard: str) -> tuple[int, int]:
        """Rows [start, end) of shard ``shard`` in the merged weight."""
        idx = self.shard_names.index(shard)
        start = sum(self.output_sizes[:idx])
        return start, start + self.output_sizes[idx]

    def load_shard(self, param_name: str, shard: str, loaded: torch.Tensor) -> None:
        """Load one projection's ``weight`` or ``bias`` into its rows of the merged parameter."""
        param = getattr(self, param_name)
        if param is None:
            raise ValueError(f"checkpoint has a {param_name} for shard {shard!r} but the layer has none")
        start, end = self.shard_range(shard)
        copy_checked(param.data[start:end], loaded, f"{shard}.{param_name}")

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """y [..., sum(output_sizes)] -> one view per shard."""
        return y.split(self.output_sizes, dim=-1)


class VocabEmbedding(nn.Module):
    """Token embedding table [vocab_size, hidden_size], allocated uninitialized. ``head_backend``
    computes ``project`` when the table is a tied lm_head (a packing backend packs a copy: the
    table stays for lookups)."""

    head_backend: LinearBackend

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=dtype), requires_grad=False)
        self.head_backend = TorchLinear()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, head_backend={self.head_backend.name}"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., embedding_dim] -> [..., num_embeddings]: the table used as a tied lm_head."""
        return self.head_backend.apply(self, hidden, True)
