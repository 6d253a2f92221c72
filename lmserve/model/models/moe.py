"""Mixture-of-experts decoders with paged attention: Mixtral and Qwen3-MoE, as causal LMs (also
usable as LAST-pooling embedding models) and as sequence classifiers.

The attention, norms, RoPE and dense MLP are the Llama family's (``llama.py``; Qwen3-MoE has
Qwen3's q/k norms); each sparse layer's feed-forward is a ``FusedMoE`` (``layers/fused_moe.py``).
What the config says, read once by ``MoeSpec.from_config``:
- Mixtral (``model_type`` "mixtral"): every layer sparse; ``num_local_experts``,
  ``num_experts_per_tok``, experts of ``intermediate_size``; top-k weights always renormalized.
- Qwen3-MoE ("qwen3_moe"): layer i is sparse iff i is not in ``mlp_only_layers`` and
  ``(i + 1) % decoder_sparse_step == 0`` (else a dense MLP of ``intermediate_size``);
  ``num_experts``, experts of ``moe_intermediate_size``; renormalized iff ``norm_topk_prob``.
  There is no shared expert (that is Qwen2-MoE, which is not supported).

Weights: per-expert checkpoint tensors (Mixtral's ``block_sparse_moe.experts.{e}.w1/w2/w3``,
Qwen3-MoE's ``mlp.experts.{e}.gate_proj/up_proj/down_proj``), GGUF's stacked ``[E, ...]`` tensors
and transformers' fused ``experts.gate_up_proj`` / ``experts.down_proj`` are all stacked into
the layer's ``[E, ...]`` parameters at load time (``stack_expert_weights``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmserve.distributed.parallel_state import ParallelContext
from lmserve.model.layers.parallel_linear import refuse_tensor_parallel
from lmserve.model.backends.block_formats import BlockQuantizedWeight
from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.fused_moe import FusedMoE
from lmserve.model.layers.linear import Linear, VocabEmbedding
from lmserve.model.layers.norm import RMSNorm
from lmserve.model.layers.rotary import RotaryEmbedding
from lmserve.model.models.llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel,
                                        _head_dim, load_llama_weights)

MOE_MODEL_TYPES = ("mixtral", "qwen3_moe")


@dataclass(frozen=True)
class MoeSpec:
    """The MoE geometry of a config (see the module docstring for where each field comes from)."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    renormalize: bool
    sparse_layers: tuple[bool, ...]  # per layer: FusedMoE (True) or dense MLP (False)

    @classmethod
    def from_config(cls, config: Any) -> MoeSpec:
        model_type = getattr(config, "model_type", "")
        n_layers = int(config.num_hidden_layers)
        if model_type == "mixtral":
            return cls(int(config.num_local_experts), int(config.num_experts_per_tok), int(config.intermediate_size),
                       True, (True,) * n_layers)
        if model_type == "qwen3_moe":
            num_experts = int(config.num_experts)
            step = int(getattr(config, "decoder_sparse_step", 1) or 1)
            dense = set(getattr(config, "mlp_only_layers", None) or [])
            sparse = tuple(num_experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(n_layers))
            return cls(num_experts, int(config.num_experts_per_tok), int(config.moe_intermediate_size),
                       bool(getattr(config, "norm_topk_prob", False)), sparse)
        raise ValueError(f"model_type {model_type!r} is not a supported mixture-of-experts model "
                         f"(supported: {', '.join(MOE_MODEL_TYPES)})")


class MoeDecoderLayer(nn.Module):
    """A Llama decoder layer whose ``mlp`` is a ``FusedMoE`` (sparse layers) or a ``LlamaMLP``."""

    forward = LlamaDecoderLayer.forward

    def __init__(self, config: Any, layer_idx: int, spec: MoeSpec, dtype: torch.dtype) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        self.self_attn = LlamaAttention(config, layer_idx, dtype)
        if spec.sparse_layers[layer_idx]:
            self.mlp = FusedMoE(config.hidden_size, spec.expert_intermediate_size, spec.num_experts, spec.top_k,
                                spec.renormalize, dtype)
        else:
            self.mlp = LlamaMLP(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)


class MoeModel(nn.Module):
    """``LlamaModel`` with ``MoeDecoderLayer``s (same forward, same parameter names)."""

    forward = LlamaModel.forward
    local_layers = LlamaModel.local_layers
    # one stage holding every layer (no pipeline split for mixture-of-experts models)
    pp_size, is_first_stage, is_last_stage = 1, True, True

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.start_layer, self.end_layer = 0, config.num_hidden_layers
        spec = MoeSpec.from_config(config)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(MoeDecoderLayer(config, i, spec, dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.rotary_emb = RotaryEmbedding.from_config(config, _head_dim(config), dtype)


class _MoeBase(nn.Module):
    needs_kv_cache = True
    uses_token_type_ids = False

    max_position = LlamaForCausalLM.max_position
    kv_cache_spec = LlamaForCausalLM.kv_cache_spec

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        refuse_tensor_parallel(parallel, f"{type(self).__name__} (mixture of experts)")
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.parallel = parallel or ParallelContext.single()
        self.model = MoeModel(config, dtype)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As ``LlamaForCausalLM.forward`` (always layer by layer): hidden states [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)


class MoeForCausalLM(_MoeBase):
    """``MixtralForCausalLM`` / ``Qwen3MoeForCausalLM``: the interface of ``LlamaForCausalLM``
    (forward, compute_logits, kv_cache_spec, load_weights) without its native decode step (that
    kernel has no expert dispatch), so no ``decode_step`` attribute."""

    pooling_tasks: tuple[str, ...] = ("embed", "token_embed")
    default_pooling_type = "LAST"

    compute_logits = LlamaForCausalLM.compute_logits

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        super().__init__(config, dtype, parallel)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """As ``LlamaForCausalLM.load_weights``, expert tensors stacked (``stack_expert_weights``)."""
        skip = "lm_head." if self.tie_word_embeddings else None
        return load_llama_weights(self, stack_expert_weights(self, weights), skip_prefix=skip)


class MoeForSequenceClassification(_MoeBase):
    """``MixtralForSequenceClassification`` / ``Qwen3MoeForSequenceClassification``: the MoE
    decoder with a ``score`` head pooled at the LAST token (as ``LlamaForSequenceClassification``)."""

    pooling_tasks: tuple[str, ...] = ("classify", "score", "token_classify")
    default_pooling_type = "LAST"

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        super().__init__(config, dtype, parallel)
        self.num_labels = int(config.num_labels)
        self.score = Linear(config.hidden_size, self.num_labels, bias=False, dtype=dtype)

    @torch.no_grad()
    def classifier_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [N, hidden] (any float dtype) -> logits [N, num_labels] float32."""
        return self.score(pooled.to(self.dtype)).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_llama_weights(self, stack_expert_weights(self, weights))


# model.layers.{L}.(block_sparse_moe|mlp).experts[.{e}].{proj}[.weight]; no expert index = stacked [E, ...]
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(?:(\d+)\.)?"
                        r"(w1|w2|w3|gate_proj|up_proj|down_proj|gate_up_proj)(?:\.weight)?$")
_PROJ_KIND = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def stack_expert_weights(model: nn.Module, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Pass every tensor through except expert weights, which are collected per layer and yielded
    as the layer's stacked parameters (``...mlp.experts.gate_up_proj`` [E, 2I, H] = gate rows then up
    rows per expert; ``...mlp.experts.down_proj`` [E, H, I]) as soon as all their experts arrived.
    Mixtral's ``block_sparse_moe.`` is renamed ``mlp.``. ValueError for an expert index out of
    range, a name of a dense layer's experts, or experts still incomplete at the end."""
    counts = {name.rsplit(".experts.", 1)[0]: m.num_experts for name, m in model.named_modules()
              if isinstance(m, FusedMoE)}
    pending: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (layer prefix, gate|up|down) -> expert -> W
    for name, tensor in weights:
        m = _EXPERT_RE.match(name)
        if m is None:
            yield name.replace(".block_sparse_moe.", ".mlp."), tensor
            continue
        prefix, index, proj = m.group(1), m.group(2), m.group(3)
        mlp = f"{prefix}.mlp"
        if mlp not in counts:
            raise ValueError(f"{name}: expert weights for a layer that has no experts in this config")
        if isinstance(tensor, BlockQuantizedWeight):
            tensor = tensor.dequantize()  # a block-quantized GGUF expert: experts run dense
        if proj == "gate_up_proj" and index is None:  # transformers' fused layout already
            yield f"{mlp}.experts.gate_up_proj", tensor
            continue
        kind = _PROJ_KIND.get(proj)
        if kind is None:
            raise ValueError(f"{name}: unexpected expert weight")
        slots = pending.setdefault((prefix, kind), {})
        if index is None:
            slots.update(enumerate(tensor.unbind(0)))
        else:
            slots[int(index)] = tensor
        n = counts[mlp]
        if any(e >= n for e in slots):
            raise ValueError(f"{name}: expert index out of range for num_experts={n}")
        if kind == "down" and len(slots) == n:
            yield f"{mlp}.experts.down_proj", torch.stack([slots[e] for e in range(n)])
            del pending[(prefix, kind)]
        elif kind in ("gate", "up"):
            gate, up = pending.get((prefix, "gate"), {}), pending.get((prefix, "up"), {})
            if len(gate) == n and len(up) == n:
                yield f"{mlp}.experts.gate_up_proj", torch.stack([torch.cat([gate[e], up[e]]) for e in range(n)])
                del pending[(prefix, "gate")], pending[(prefix, "up")]
    if pending:
        incomplete = ", ".join(f"{p} {k} ({len(s)} experts)" for (p, k), s in sorted(pending.items()))
        raise ValueError(f"Expert weights incomplete in checkpoint: {incomplete}")
