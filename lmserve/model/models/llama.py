"""Llama-family decoder models with paged attention: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2,
as causal LMs (also usable as LAST-pooling embedding models) and as sequence classifiers.

Variants differ only in flags read from the Hugging Face config:
- QKV bias: ``attention_bias`` (Llama, Mistral, Qwen3) or always on for Qwen2 (o_proj without);
- Qwen3: per-head RMSNorm of q and k (``q_norm``/``k_norm``) before RoPE;
- tied embeddings (``tie_word_embeddings``, e.g. SmolLM2);
- ``head_dim`` from the config when given; sliding window per layer (Mistral, Qwen2 ``layer_types``).

Tensor parallelism (``parallel=``, a ``ParallelContext``): each rank builds its shards
(``layers/parallel_linear.py``) and ``load_llama_weights`` cuts every checkpoint tensor to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmserve.distributed.parallel_state import ParallelContext
from lmserve.model.layers.activation import SiluAndMul
from lmserve.model.layers.attention import KVCacheSpec, PagedAttention
from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.linear import Linear, VocabEmbedding, copy_checked
from lmserve.model.layers.norm import RMSNorm
from lmserve.model.backends.block_formats import BlockQuantizedWeight
from lmserve.model.layers.parallel_linear import (ShardedLayer, gate_up_linear, head_layout, lm_head, qkv_linear,
                                                   row_linear, vocab_embedding)
from lmserve.model.layers.quantized_linear import quantized_module_for
from lmserve.model.layers.rotary import RotaryEmbedding, RotaryInputs
from lmserve.model.layers.sharding import Weight, materialize

if TYPE_CHECKING:
    from lmserve.lora.batch import LoRAStepMapping
    from lmserve.model.layers.cpu_kernels.decode_step import LlamaDecodeStep

# Checkpoint tensors that are derived state, never weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# HF projection name -> (merged module name, shard name)
_MERGED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}
# Name under which loaders pass llama.cpp's per-dimension RoPE frequency factors.
ROPE_FREQ_FACTORS = "model.rotary_emb.freq_factors"


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _sliding_window(config: Any, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


class LlamaAttention(nn.Module):
    """Self-attention; under tensor parallelism this rank's heads (``HeadLayout``): Q/K/V
    column-parallel by heads, ``o_proj`` row-parallel (all-reduced)."""

    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype, parallel: ParallelContext | None = None
                 ) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        heads = head_layout(total_heads, total_kv_heads, parallel)
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads  # this rank's
        self.head_dim = _head_dim(config)
        model_type = getattr(config, "model_type", "")
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias or model_type == "qwen2"
        self.qkv_proj = qkv_linear(hidden, total_heads, total_kv_heads, self.head_dim, parallel, bias=qkv_bias,
                                   dtype=dtype)
        self.o_proj = row_linear(total_heads * self.head_dim, hidden, parallel, bias=attention_bias, dtype=dtype)
        self.qk_norm = model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, dtype=dtype)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5,
                                   sliding_window=_sliding_window(config, layer_idx))

    def forward(self, hidden: torch.Tensor, rope: RotaryInputs, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """hidden [T, hidden]; ``rope`` at the T positions -> [T, hidden]."""
        T = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden, meta.decode_only, meta.lora))
        q = q.reshape(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.reshape(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.qk_norm:  # per head, as rows of head_dim (2-D, so the fused CPU norm takes them)
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(T, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(T, self.num_kv_heads, self.head_dim)
        q, k = rope.rotate(q, k)
        out = self.attn(q, k, v, kv_cache, meta)  # [T, Hq, D]
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim), meta.decode_only, meta.lora)


class LlamaMLP(nn.Module):
    """SiLU-gated MLP; under tensor parallelism gate/up column-parallel, down row-parallel."""

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise NotImplementedError(f"hidden_act {act!r} is not supported (only silu)")
        bias = bool(getattr(config, "mlp_bias", False))
        inter = config.intermediate_size
        self.gate_up_proj = gate_up_linear(config.hidden_size, inter, parallel, bias=bias, dtype=dtype)
        self.act_fn = SiluAndMul()
        self.down_proj = row_linear(inter, config.hidden_size, parallel, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor, decode_only: bool = False, lora: LoRAStepMapping | None = None
                ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; ``decode_only`` and ``lora`` as ``Linear.forward``."""
        return self.down_proj(self.act_fn(self.gate_up_proj(x, decode_only, lora)), decode_only, lora)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype, parallel: ParallelContext | None = None
                 ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, dtype, parallel)
        self.mlp = LlamaMLP(config, dtype, parallel)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RotaryInputs,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block with the residual carried separately: returns (mlp output, residual)
        whose sum is HF's layer output."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, meta.decode_only, meta.lora), residual


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """The layers ``[start, end)`` of pipeline stage ``pp_rank``: as even a split as possible, the
    first stages taking one more when it does not divide (vLLM splits the same way)."""
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size ({pp_size}) is larger than the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


class PPMissingLayer(nn.Identity):
    """Stands for a module another pipeline stage holds: no parameters, never called."""


class LlamaModel(nn.Module):
    """The decoder stack, or one pipeline stage of it: the first stage holds ``embed_tokens``, the
    last one ``norm``; each holds the layers ``[start_layer, end_layer)`` (the others are
    ``PPMissingLayer``, so parameter names keep their checkpoint layer numbers). Within a stage,
    layers hold this rank's tensor-parallel shards (``parallel``)."""

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        super().__init__()
        parallel = parallel if parallel is not None else ParallelContext.single()
        self.pp_size = parallel.pp_size
        self.is_first_stage, self.is_last_stage = parallel.is_first_stage, parallel.is_last_stage
        n = config.num_hidden_layers
        self.start_layer, self.end_layer = pp_layer_range(n, parallel.pp_rank, parallel.pp_size)
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size, parallel, dtype=dtype) \
            if self.is_first_stage else PPMissingLayer()
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, dtype, parallel)
                                    if self.start_layer <= i < self.end_layer else PPMissingLayer() for i in range(n))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype) \
            if self.is_last_stage else PPMissingLayer()
        self.rotary_emb = RotaryEmbedding.from_config(config, _head_dim(config), dtype, allow_partial=True)

    @property
    def local_layers(self) -> list[nn.Module]:
        return list(self.layers[self.start_layer:self.end_layer])

    def owns_weight(self, name: str) -> bool:
        """Whether the checkpoint tensor ``name`` (``model.layers.3.mlp...``) belongs to this stage."""
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
            return self.start_layer <= int(parts[2]) < self.end_layer
        if name.startswith("model.embed_tokens."):
            return self.is_first_stage
        if name.startswith("model.norm."):
            return self.is_last_stage
        return True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The first stage embeds ``input_ids``; a later one continues from the previous stage's
        ``intermediate`` (hidden, residual). ``kv_caches`` are this stage's layers' caches. The last
        stage returns the normed hidden states [T, hidden], another one (hidden, residual)."""
        if intermediate is None:
            hidden, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        else:
            hidden, residual = intermediate
        rope = self.rotary_emb.inputs_for(positions)
        for layer, kv_cache in zip(self.local_layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rope, kv_cache, meta)
        if not self.is_last_stage:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden


# The projection modules LoRA adapters may target (``lmserve/lora/checkpoint.py`` names the same).
LORA_TARGETS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def enable_lora(model: nn.Module) -> int:
    """Names every adaptable projection (``Linear.lora_key``) of a model holding a ``LlamaModel``
    as ``model.model``, so a step's ``AttentionMetadata.lora`` reaches it. Returns their number.
    ValueError for a tensor-parallel model: adapters' deltas are not sharded."""
    parallel = getattr(model, "parallel", None)
    if parallel is not None and parallel.tp_size > 1:
        raise ValueError("LoRA adapters (--enable-lora) do not support tensor parallelism yet "
                         f"(tensor_parallel_size={parallel.tp_size}); use tensor_parallel_size 1")
    count = 0
    for i, layer in enumerate(model.model.layers):
        for sub in LORA_TARGETS:
            module = layer.get_submodule(sub)
            module.lora_key = f"model.layers.{i}.{sub}"
            count += 1
    return count


class LlamaForCausalLM(nn.Module):
    """Causal LM over a flat (varlen) batch with a paged KV cache.

    Parameters are created uninitialized in ``dtype`` on the current default device; call
    ``load_weights`` (or initialize them) before use. As a pooling model (``--runner pooling``)
    it is an embedding model over its final hidden states; its lm_head is loaded but unused.
    """

    pooling_tasks: tuple[str, ...] = ("embed", "token_embed")
    default_pooling_type = "LAST"
    needs_kv_cache = True
    uses_token_type_ids = False

    # the native one-call decode step (``backends/decode_step.py``), set when the backends are bound
    decode_step: LlamaDecodeStep | None = None

    # ``LlamaModel`` splits into pipeline stages; a subclass whose layers differ sets this False
    supports_pipeline_parallel = True

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.parallel = parallel or ParallelContext.single()
        self.model = LlamaModel(config, dtype, self.parallel)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.model.is_last_stage:
            self.lm_head = PPMissingLayer()
        elif self.tie_word_embeddings and self.model.is_first_stage:
            self.lm_head = self.model.embed_tokens
        elif self.tie_word_embeddings:  # a later stage: its own copy, loaded from model.embed_tokens.weight
            self.lm_head = vocab_embedding(config.vocab_size, config.hidden_size, self.parallel, dtype=dtype)
        else:
            self.lm_head = lm_head(config.hidden_size, config.vocab_size, self.parallel, dtype=dtype)

    @property
    def max_position(self) -> int:
        """Longest context the RoPE cache covers (positions must stay below it)."""
        return self.model.rotary_emb.max_position

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [T] (flat batch, laid out as ``attn_metadata`` says); one KV cache
        per layer -> hidden states [T, hidden] after the final norm. ``token_type_ids`` is ignored.
        A step the native ``decode_step`` takes (decode-only, few enough sequences, no LoRA
        adapter: it has no delta of its own) runs there."""
        if self.decode_step is not None and attn_metadata.lora is None and self.decode_step.takes(attn_metadata):
            return self.decode_step(input_ids, positions, kv_caches, attn_metadata)
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    @torch.no_grad()
    def forward_stage(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                      attn_metadata: AttentionMetadata, intermediate: tuple[torch.Tensor, torch.Tensor] | None
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One pipeline stage's part of ``forward`` (``LlamaModel.forward``): from the token ids on
        the first stage, else from the previous stage's (hidden, residual)."""
        return self.model(input_ids, positions, kv_caches, attn_metadata, intermediate)

    @torch.no_grad()
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, hidden] -> logits [N, vocab] in float32 (matmul in the model dtype).
        Under tensor parallelism every rank gets the full-vocab logits (a collective: all TP
        ranks call it with the same rows)."""
        head = self.lm_head
        # the lm_head sees only the sampling rows: their count alone picks a quantized head's path
        logits = head.project(hidden_states) if isinstance(head, VocabEmbedding) else head(hidden_states, True)
        return logits.float()

    def kv_cache_spec(self) -> KVCacheSpec:
        """This stage's layers' KV cache."""
        layers = self.model.local_layers
        attn = layers[0].self_attn
        return KVCacheSpec(num_layers=len(layers), num_kv_heads=attn.num_kv_heads,
                           head_dim=attn.head_dim, dtype=self.dtype)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named tensors (``model.layers.0.self_attn.q_proj.weight``, ...).

        Ignores ``rotary_emb.inv_freq``-style buffers and ``lm_head.weight`` when embeddings are
        tied, and (a pipeline stage) the tensors of other stages; a tied last stage that is not the
        first loads its head from ``model.embed_tokens.weight``. Raises ValueError on unknown
        names, shape mismatches, or weights left unloaded. Returns the set of HF names loaded.
        """
        skip = "lm_head." if self.tie_word_embeddings else None
        inner = self.model
        if inner.pp_size > 1:
            tied_tail = self.tie_word_embeddings and inner.is_last_stage and not inner.is_first_stage

            def stage_weights():
                for name, tensor in weights:
                    if tied_tail and name == "model.embed_tokens.weight":
                        yield "lm_head.weight", tensor
                    elif inner.owns_weight(name) and not (name.startswith("lm_head.") and not inner.is_last_stage):
                        yield name, tensor

            return load_llama_weights(self, stage_weights(), skip_prefix=None if tied_tail else skip)
        return load_llama_weights(self, weights, skip_prefix=skip)


class LlamaForSequenceClassification(nn.Module):
    """Llama-family decoder with a ``score`` head (HF ``*ForSequenceClassification``): a
    classifier / reward / cross-encoder model pooled at the LAST token (as HF pools the last
    non-padding token). Checkpoint names: ``model.*`` and ``score.weight`` (no bias)."""

    pooling_tasks: tuple[str, ...] = ("classify", "score", "token_classify")
    default_pooling_type = "LAST"
    needs_kv_cache = True
    uses_token_type_ids = False

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        super().__init__()
        if parallel is not None and parallel.world_size > 1:
            raise ValueError(f"{type(self).__name__} (a pooling model) runs on one rank: use "
                             "--tensor-parallel-size 1 --pipeline-parallel-size 1")
        self.config = config
        self.dtype = dtype
        self.parallel = parallel or ParallelContext.single()
        self.num_labels = int(config.num_labels)
        self.model = LlamaModel(config, dtype, self.parallel)  # the score head is replicated
        self.score = Linear(config.hidden_size, self.num_labels, bias=False, dtype=dtype)

    @property
    def max_position(self) -> int:
        return self.model.rotary_emb.max_position

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As ``LlamaForCausalLM.forward``: hidden states [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    @torch.no_grad()
    def classifier_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [N, hidden] (any float dtype) -> logits [N, num_labels] float32."""
        return self.score(pooled.to(self.dtype)).float()

    def kv_cache_spec(self) -> KVCacheSpec:
        attn = self.model.layers[0].self_attn
        return KVCacheSpec(num_layers=len(self.model.layers), num_kv_heads=attn.num_kv_heads,
                           head_dim=attn.head_dim, dtype=self.dtype)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """As ``LlamaForCausalLM.load_weights``, with ``score.weight`` instead of an lm_head."""
        return load_llama_weights(self, weights)


def _quantized_owner(model: nn.Module, module_name: str) -> nn.Module | None:
    """The module ``module_name`` swapped (everywhere it is referenced, so a tied lm_head
    follows) for its quantized counterpart; None if it has none (the weight is then dequantized)."""
    old = model.get_submodule(module_name)
    new = quantized_module_for(old)
    if new is not None and new is not old:
        for parent in model.modules():
            for child_name, child in parent._modules.items():  # noqa: SLF001 - no public re-parenting API
                if child is old:
                    parent._modules[child_name] = new  # noqa: SLF001
    return new


def _sharded_owner(model: nn.Module, module_name: str) -> ShardedLayer | None:
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return module if isinstance(module, ShardedLayer) else None


def load_llama_weights(model: nn.Module, weights: Iterable[tuple[str, Weight]],
                       skip_prefix: str | None = None) -> set[str]:
    """Copy HF-named tensors into a model holding a ``LlamaModel`` as ``model.model``; Q/K/V and
    gate/up load into their merged projections. Names starting with ``skip_prefix`` are ignored
    (and their parameters not expected). ValueError on unknown names, shape mismatches, or
    parameters left unloaded. Returns the HF names loaded.

    A ``BlockQuantizedWeight`` (a GGUF Q4_0/Q4_1/Q8_0 matrix kept quantized) turns the linear or
    embedding module it belongs to into its quantized counterpart (``quantized_linear``), which
    keeps the packed weight and the dequantized one (as the same ``weight`` Parameter).

    Tensor parallelism: a tensor whose module is a ``ShardedLayer`` is cut to this rank's piece
    (``shard_weight``) before anything else; a ``LazyWeight`` (what loaders yield for a sharded
    model) is then read only there, every other tensor read whole."""
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {name for name in params if not (skip_prefix and name.startswith(skip_prefix))}
    filled: set[str] = set()  # model parameter names (merged ones once all shards arrived)
    shards_seen: dict[str, set[str]] = {}
    loaded: set[str] = set()
    unknown: list[str] = []
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == ROPE_FREQ_FACTORS:
            model.model.rotary_emb.set_freq_factors(materialize(tensor))
            loaded.add(name)
            continue
        if skip_prefix and name.startswith(skip_prefix):
            continue
        parts = name.split(".")
        merged = _MERGED.get(parts[-2]) if len(parts) >= 2 else None
        owner = _sharded_owner(model, ".".join(parts[:-2] + [merged[0]]) if merged else ".".join(parts[:-1]))
        if owner is not None:
            tensor = owner.shard_weight(parts[-1], tensor, merged[1] if merged else None)
            if tensor is None:  # a parameter other ranks hold (a row-parallel bias)
                loaded.add(name)
                continue
        tensor = materialize(tensor)
        quantized = isinstance(tensor, BlockQuantizedWeight)
        if merged is not None:
            module_name = ".".join(parts[:-2] + [merged[0]])
            target = f"{module_name}.{parts[-1]}"
            if target not in params:
                unknown.append(name)
                continue
            module = _quantized_owner(model, module_name) if quantized else model.get_submodule(module_name)
            module.load_shard(parts[-1], merged[1], tensor)
            seen = shards_seen.setdefault(target, set())
            seen.add(merged[1])
            if len(seen) == len(module.shard_names):
                filled.add(target)
        elif name in params:
            module = _quantized_owner(model, ".".join(parts[:-1])) if quantized else None
            if module is not None:
                module.load_quantized(tensor, name)
            else:
                copy_checked(params[name], tensor.dequantize() if quantized else tensor, name)
            filled.add(name)
        else:
            unknown.append(name)
            continue
        loaded.add(name)
    if unknown:
        raise ValueError(f"Unexpected weights in checkpoint for {type(model).__name__}: "
                         f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
    missing = sorted(expected - filled)
    if missing:
        raise ValueError(f"Weights missing from checkpoint: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}")
    return loaded
