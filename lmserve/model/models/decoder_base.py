"""What the non-Llama decoder models share, so that each model file only states its layer order,
its config fields and its checkpoint names (``gpt2.py``, ``opt.py``, ``gemma2.py``, ``gpt_neox.py``).

Internal names (what ``load_weights`` fills; each model's ``rename_weight`` maps its checkpoint's
names, and its GGUF tensors, onto them):
- ``model.embed_tokens``, ``model.embed_positions`` (learned positions), ``model.layers.N.*``,
  ``model.norm`` (final norm), ``lm_head`` (absent when tied to the embeddings);
- attention ``model.layers.N.self_attn.{q,k,v}_proj`` (loaded into the merged ``qkv_proj``) and
  ``o_proj``; gated MLPs ``mlp.{gate,up}_proj`` (into ``gate_up_proj``) and ``mlp.down_proj``;
  plain MLPs ``mlp.fc_in`` / ``mlp.fc_out``.
Every model runs on the same paged attention, flat varlen batch and compute backends as
``LlamaForCausalLM`` (``bind_backends`` gives each ``Linear``/``RMSNorm``/``PagedAttention`` its
backend); none of them has the Llama-only native one-call decode step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lmserve.distributed.parallel_state import ParallelContext
from lmserve.model.layers.parallel_linear import (gate_up_linear, head_layout, lm_head, qkv_linear,
                                                   refuse_tensor_parallel, row_linear)
from lmserve.model.backends.block_formats import BlockQuantizedWeight
from lmserve.model.layers.activation import GeluAndMul, SiluAndMul, activation_fn
from lmserve.model.layers.attention import KVCacheSpec, PagedAttention
from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.linear import Linear, VocabEmbedding
from lmserve.model.layers.norm import RMSNorm
from lmserve.model.layers.rotary import RotaryInputs
from lmserve.model.models.llama import load_llama_weights

Weight = torch.Tensor | BlockQuantizedWeight


def split_rows(tensor: Weight, sizes: list[int]) -> list[Weight]:
    """A fused weight or bias [sum(sizes), ...] (dense or GGUF blocks) cut into row blocks."""
    if isinstance(tensor, BlockQuantizedWeight):
        return [BlockQuantizedWeight(tensor.qtype, b.contiguous()) for b in tensor.blocks.split(sizes, dim=0)]
    return list(tensor.split(sizes, dim=0))


def fused_qkv(prefix: str, suffix: str, tensor: Weight, sizes: list[int]) -> Iterator[tuple[str, Weight]]:
    """``prefix.{q,k,v}_proj.suffix`` for a fused QKV weight or bias laid out [Q; K; V]."""
    for shard, part in zip(("q_proj", "k_proj", "v_proj"), split_rows(tensor, sizes), strict=True):
        yield f"{prefix}.{shard}.{suffix}", part


class DecoderAttention(nn.Module):
    """Self-attention over the paged KV cache: merged QKV projection, optional per-head norms of q
    and k (Gemma 3), RoPE over the first ``rotary_dim`` of each head when the layer is given
    ``RotaryInputs`` (none for learned positions), then ``PagedAttention`` and ``o_proj``. With a
    tensor-parallel ``parallel``: this rank's heads (as ``LlamaAttention``)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, *,
                 qkv_bias: bool, o_bias: bool, scale: float, sliding_window: int | None = None,
                 logits_soft_cap: float | None = None, qk_norm_eps: float | None = None,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__()
        heads = head_layout(num_heads, num_kv_heads, parallel)
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, head_dim
        self.qkv_proj = qkv_linear(hidden, num_heads, num_kv_heads, head_dim, parallel, bias=qkv_bias, dtype=dtype)
        self.o_proj = row_linear(num_heads * head_dim, hidden, parallel, bias=o_bias, dtype=dtype)
        self.qk_norm = qk_norm_eps is not None
        if self.qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=qk_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(head_dim, eps=qk_norm_eps, dtype=dtype)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, head_dim, scale=scale,
                                   sliding_window=sliding_window,
                                   logits_soft_cap=logits_soft_cap)

    def forward(self, hidden: torch.Tensor, rope: RotaryInputs | None, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """hidden [T, hidden] -> [T, hidden]."""
        T = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden, meta.decode_only))
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(T, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(T, self.num_kv_heads, self.head_dim)
        if rope is not None:
            q, k = rope.rotate(q, k)
        out = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim), meta.decode_only)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate|up merged; ``act`` silu (native backend) or a GELU.
    Tensor parallel: gate/up column-parallel, down row-parallel."""

    def __init__(self, hidden: int, inter: int, act: str, dtype: torch.dtype, bias: bool = False,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_linear(hidden, inter, parallel, bias=bias, dtype=dtype)
        self.act_fn = SiluAndMul() if act in ("silu", "swish") else GeluAndMul(act)
        self.down_proj = row_linear(inter, hidden, parallel, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor, decode_only: bool = False) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x, decode_only)), decode_only)


class PlainMLP(nn.Module):
    """fc_out(act(fc_in(x))) (GPT-2, OPT, GPT-NeoX)."""

    def __init__(self, hidden: int, inter: int, act: str, dtype: torch.dtype, bias: bool = True) -> None:
        super().__init__()
        self.fc_in = Linear(hidden, inter, bias=bias, dtype=dtype)
        self.act = act
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = activation_fn(act)
        self.fc_out = Linear(inter, hidden, bias=bias, dtype=dtype)

    def extra_repr(self) -> str:
        return f"act={self.act}"

    def forward(self, x: torch.Tensor, decode_only: bool = False) -> torch.Tensor:
        return self.fc_out(self.act_fn(self.fc_in(x, decode_only)), decode_only)


def layer_norm(hidden: int, eps: float, dtype: torch.dtype, affine: bool = True, bias: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(hidden, eps=eps, elementwise_affine=affine, bias=bias, dtype=dtype)


class DecoderModelBase(nn.Module):
    """The inner model (``model.model``): subclasses build ``embed_tokens``, ``layers`` and
    ``norm`` and define ``forward(input_ids, positions, kv_caches, meta) -> hidden [T, hidden]``
    after the final norm, and ``max_position`` (positions must stay below it)."""

    max_position: int

    def attention_layers(self) -> list[PagedAttention]:
        return [m for m in self.modules() if isinstance(m, PagedAttention)]


class DecoderForCausalLM(nn.Module):
    """Causal LM over a flat (varlen) batch with a paged KV cache, for the models of this module's
    docstring. Subclasses set ``model_class`` (a ``DecoderModelBase``) and ``rename_weight``;
    ``hidden_out`` is the width the lm_head reads (OPT's ``word_embed_proj_dim``).

    The same contract as ``LlamaForCausalLM``: ``forward`` -> hidden [T, hidden], ``compute_logits``
    -> float32 logits (``final_logit_softcapping`` applied when the config has it); as a pooling
    model (``--runner pooling``) it is a LAST-pooling embedding model over the final hidden states.
    """

    pooling_tasks: tuple[str, ...] = ("embed", "token_embed")
    default_pooling_type = "LAST"
    needs_kv_cache = True
    uses_token_type_ids = False
    model_class: type[DecoderModelBase]
    has_lm_head = True
    # whether ``model_class`` takes a ``parallel`` argument and shards (DecoderAttention, GatedMLP)
    supports_tensor_parallel = False

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        if not self.supports_tensor_parallel:
            refuse_tensor_parallel(parallel, type(self).__name__)
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.parallel = parallel or ParallelContext.single()
        if self.supports_tensor_parallel:
            self.model = self.model_class(config, dtype, parallel=self.parallel)
        else:
            self.model = self.model_class(config, dtype)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.final_logit_softcap = getattr(config, "final_logit_softcapping", None) or None
        if not self.has_lm_head:
            return
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = lm_head(self.hidden_out(config), config.vocab_size, self.parallel, dtype=dtype)

    @staticmethod
    def hidden_out(config: Any) -> int:
        return config.hidden_size

    @property
    def max_position(self) -> int:
        return self.model.max_position

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [T]; one KV cache per layer -> hidden [T, hidden_out]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    @torch.no_grad()
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, hidden_out] -> logits [N, vocab] float32."""
        head = self.lm_head
        logits = head.project(hidden_states) if isinstance(head, VocabEmbedding) else head(hidden_states, True)
        logits = logits.float()
        if self.final_logit_softcap is not None:
            cap = float(self.final_logit_softcap)
            logits = torch.tanh(logits / cap) * cap
        return logits

    def kv_cache_spec(self) -> KVCacheSpec:
        attn = self.model.attention_layers()
        return KVCacheSpec(num_layers=len(attn), num_kv_heads=attn[0].num_kv_heads, head_dim=attn[0].head_dim,
                           dtype=self.dtype)

    def rename_weight(self, name: str, tensor: Weight) -> Iterable[tuple[str, Weight]]:
        """One checkpoint tensor -> zero or more (internal name, tensor) pairs (module docstring)."""
        raise NotImplementedError

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Weight]]) -> set[str]:
        """Load a checkpoint's tensors (HF names, or the GGUF loader's names for this architecture)
        through ``rename_weight``. ValueError on unknown names, shape mismatches or missing weights.
        Returns the internal names loaded."""
        renamed = (pair for name, tensor in weights for pair in self.rename_weight(name, tensor))
        skip = "lm_head." if self.tie_word_embeddings or not self.has_lm_head else None
        return load_llama_weights(self, renamed, skip_prefix=skip)


class DecoderForSequenceClassification(DecoderForCausalLM):
    """A decoder with a ``score`` head (HF ``*ForSequenceClassification``), pooled at the LAST
    token: classifier / reward / cross-encoder. Subclasses also derive from the causal class
    whose ``model_class`` and ``rename_weight`` they reuse; ``score.weight`` has no bias."""

    pooling_tasks: tuple[str, ...] = ("classify", "score", "token_classify")
    has_lm_head = False

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        super().__init__(config, dtype, parallel)
        self.num_labels = int(config.num_labels)
        self.score = Linear(self.hidden_out(config), self.num_labels, bias=False, dtype=dtype)

    @torch.no_grad()
    def classifier_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [N, hidden] (any float dtype) -> logits [N, num_labels] float32."""
        return self.score(pooled.to(self.dtype)).float()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} is a pooling model: it has no lm_head")


def sequence_classifier(causal: type[DecoderForCausalLM], name: str | None = None
                        ) -> type[DecoderForSequenceClassification]:
    """The ``*ForSequenceClassification`` class (``name``, by default the causal class's name with
    ``ForSequenceClassification``) of a causal model class: same body, a ``score`` head; the
    checkpoint's ``score.weight`` passes ``rename_weight`` unchanged."""
    name = name or causal.__name__.replace("ForCausalLM", "ForSequenceClassification")

    def rename_weight(self: Any, weight_name: str, tensor: Weight) -> Iterable[tuple[str, Weight]]:
        if weight_name.startswith("score."):
            return [(weight_name, tensor)]
        return causal.rename_weight(self, weight_name, tensor)

    return type(name, (DecoderForSequenceClassification, causal),
                {"rename_weight": rename_weight, "__doc__": f"{causal.__name__} with a score head.",
                 "__module__": causal.__module__})
