"""BERT encoders for pooling: ``BertModel`` (embeddings) and ``BertForSequenceClassification``
(cross-encoders / classifiers).

An encoder has no KV cache: every sequence of the flat batch is a whole prompt
(``attn_metadata.query_lens_cpu == seq_lens_cpu``) and attends bidirectionally to its own
tokens only. Attention sorts the step's prompts by length and pads groups of similar length
(``_VarlenLayout``: at most 1.2x their tokens) to [B, L] with index tensors, one
``scaled_dot_product_attention`` per group with a key-padding mask, then unpads; every other layer
runs on the flat [T, hidden] rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.distributed.parallel_state import ParallelContext
from lmserve.model.layers.parallel_linear import refuse_tensor_parallel
from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.linear import Linear, MergedLinear, VocabEmbedding, copy_checked

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# HF Q/K/V projection name -> shard of the merged qkv_proj
_QKV = {"query": "q", "key": "k", "value": "v"}


# A group of prompts padded to its longest may hold at most this many times its real tokens.
_MAX_PADDING_RATIO = 1.2


@dataclass
class _AttentionGroup:
    """Prompts of similar length padded to one [B, L] batch for one attention call."""

    num_seqs: int
    max_len: int
    gather: torch.Tensor  # [B * L] int64: flat row of each padded slot (num_tokens: a zero row)
    key_mask: torch.Tensor | None  # [B, 1, 1, L] bool, True at real keys; None when all B have length L
    real_slots: torch.Tensor | None  # [n_g] int64: padded slots holding real tokens (None: all of them)
    dest: torch.Tensor  # [n_g] int64: flat row of each real slot, in ``real_slots`` order


@dataclass
class _VarlenLayout:
    """How one step's whole prompts (flat rows ``[0, num_tokens)``) are attended: sorted by
    length and cut into groups whose padded size is at most ``_MAX_PADDING_RATIO`` x their
    tokens, each one ``scaled_dot_product_attention`` call. Built once per step, used by every
    layer. Invariant: every real row is in exactly one group; a prompt attends to its own rows only."""

    groups: list[_AttentionGroup]
    num_tokens: int

    @classmethod
    def build(cls, meta: AttentionMetadata, device: torch.device) -> "_VarlenLayout":
        if meta.query_lens_cpu != meta.seq_lens_cpu:
            raise ValueError("encoder-only models need every prompt whole in one step "
                             "(no chunked prefill, no prefix caching)")
        lens = list(meta.query_lens_cpu)
        starts = [0] * len(lens)
        for i in range(1, len(lens)):
            starts[i] = starts[i - 1] + lens[i - 1]
        n = meta.num_tokens
        order = sorted(range(len(lens)), key=lens.__getitem__)
        members: list[list[int]] = []
        tokens = 0
        for i in order:  # ascending length: the newest member is the group's longest
            if members and (len(members[-1]) + 1) * lens[i] > _MAX_PADDING_RATIO * (tokens + lens[i]):
                members.append([])
                tokens = 0
            if not members:
                members.append([])
            members[-1].append(i)
            tokens += lens[i]
        groups = [cls._group([lens[i] for i in g], [starts[i] for i in g], n, device) for g in members]
        return cls(groups, n)

    @staticmethod
    def _group(lens: list[int], starts: list[int], num_tokens: int, device: torch.device) -> _AttentionGroup:
        B, L = len(lens), max(lens)
        lens_t = torch.tensor(lens, device=device)
        offsets = torch.arange(L, device=device)
        real = offsets.unsqueeze(0) < lens_t.unsqueeze(1)  # [B, L]
        rows = torch.tensor(starts, device=device).unsqueeze(1) + offsets.unsqueeze(0)
        gather = torch.where(real, rows, num_tokens).reshape(-1)
        if min(lens) == L:
            return _AttentionGroup(B, L, gather, None, None, gather)
        real_slots = real.reshape(-1).nonzero().squeeze(1)
        return _AttentionGroup(B, L, gather, real[:, None, None, :], real_slots, gather[real_slots])


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        ptype = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if ptype != "absolute":
            raise ValueError(f"BERT position_embedding_type {ptype!r} is not supported (only absolute)")
        self.word_embeddings = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.position_embeddings = VocabEmbedding(config.max_position_embeddings, config.hidden_size, dtype=dtype)
        self.token_type_embeddings = VocabEmbedding(config.type_vocab_size, config.hidden_size, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """input_ids, positions, token_type_ids [T] -> [T, hidden]."""
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            hidden = hidden + self.token_type_embeddings.weight[0]
        else:
            hidden = hidden + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(hidden)


class BertSelfAttention(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        if hidden % self.num_heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {self.num_heads}")
        self.head_dim = hidden // self.num_heads
        self.qkv_proj = MergedLinear(hidden, [hidden] * 3, ["q", "k", "v"], bias=True, dtype=dtype)

    def forward(self, hidden: torch.Tensor, layout: _VarlenLayout) -> torch.Tensor:
        """hidden [T, hidden] -> attention output [T, hidden] (rows past the batch's tokens: 0)."""
        T, H = hidden.shape
        n = layout.num_tokens
        qkv = self.qkv_proj(hidden[:n])  # [n, 3H]
        # one zero row at index n: the padded slots' keys/values (masked) and queries (dropped)
        qkv = torch.cat([qkv, qkv.new_zeros(1, 3 * H)])
        out = qkv.new_zeros(T, H) if n < T else qkv.new_empty(n, H)
        for g in layout.groups:
            padded = qkv.index_select(0, g.gather)  # [B*L, 3H]
            q, k, v = padded.view(g.num_seqs, g.max_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.key_mask)  # [B, nh, L, D]
            o = o.transpose(1, 2).reshape(g.num_seqs * g.max_len, H)
            out.index_copy_(0, g.dest, o if g.real_slots is None else o.index_select(0, g.real_slots))
        return out


class BertAttention(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, dtype)
        self.output = BertOutput(config.hidden_size, config.hidden_size, config.layer_norm_eps, dtype)

    def forward(self, hidden: torch.Tensor, layout: _VarlenLayout) -> torch.Tensor:
        return self.output(self.self(hidden, layout), hidden)


class BertOutput(nn.Module):
    """dense, then LayerNorm(dense + residual) (HF's BertSelfOutput / BertOutput)."""

    def __init__(self, in_features: int, hidden: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = Linear(in_features, hidden, bias=True, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertIntermediate(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"BERT hidden_act {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
        self.act_fn = _ACTIVATIONS[act]
        self.erf_gelu = act == "gelu"  # fused into the matmul where the backend can (Linear.forward_gelu)
        self.dense = Linear(config.hidden_size, config.intermediate_size, bias=True, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.erf_gelu:
            return self.dense.forward_gelu(x)
        return self.act_fn(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.attention = BertAttention(config, dtype)
        self.intermediate = BertIntermediate(config, dtype)
        self.output = BertOutput(config.intermediate_size, config.hidden_size, config.layer_norm_eps, dtype)

    def forward(self, hidden: torch.Tensor, layout: _VarlenLayout) -> torch.Tensor:
        hidden = self.attention(hidden, layout)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, dtype) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, layout: _VarlenLayout) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, layout)
        return hidden


class BertPooler(nn.Module):
    """HF's BertPooler without the CLS selection (the Pooler picks the rows): tanh(dense(x))."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, bias=True, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class BertModel(nn.Module):
    """BERT encoder as an embedding model (HF ``BertModel`` checkpoints, no name prefix).

    ``forward`` returns the last hidden states [T, hidden]; the attached ``Pooler`` pools them.
    An unused ``pooler.dense.*`` in the checkpoint is accepted and ignored.
    """

    pooling_tasks: tuple[str, ...] = ("embed", "token_embed")
    default_pooling_type = "CLS"
    needs_kv_cache = False
    uses_token_type_ids = True

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        refuse_tensor_parallel(parallel, "BertModel")
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.parallel = parallel or ParallelContext.single()
        self.embeddings = BertEmbeddings(config, dtype)
        self.encoder = BertEncoder(config, dtype)

    @property
    def max_position(self) -> int:
        return int(self.config.max_position_embeddings)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions, token_type_ids (default zeros) [T]; ``kv_caches`` is [] ->
        hidden states [T, hidden]."""
        layout = _VarlenLayout.build(attn_metadata, input_ids.device)
        hidden = self.embeddings(input_ids, positions, token_type_ids)
        return self.encoder(hidden, layout)

    def kv_cache_spec(self) -> None:
        return None

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF-named tensors (``embeddings.word_embeddings.weight``, ...; a ``bert.`` prefix is
        stripped). ValueError on unknown or missing weights; buffers are ignored."""
        def rename(name: str) -> str | None:
            name = name.removeprefix("bert.")
            return None if name.startswith("pooler.") else name
        return load_bert_weights(self, weights, rename)


class BertForSequenceClassification(nn.Module):
    """BERT classifier / cross-encoder: ``bert.*`` encoder, ``bert.pooler.dense`` and
    ``classifier``. ``classifier_head`` applies HF's pooler (dense + tanh) then the classifier
    to CLS-pooled rows."""

    pooling_tasks: tuple[str, ...] = ("classify", "score", "token_classify")
    default_pooling_type = "CLS"
    needs_kv_cache = False
    uses_token_type_ids = True

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext | None = None) -> None:
        refuse_tensor_parallel(parallel, "BertForSequenceClassification")
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.parallel = parallel or ParallelContext.single()
        self.num_labels = int(config.num_labels)
        self.bert = BertModel(config, dtype)
        self.bert_pooler = BertPooler(config, dtype)
        self.classifier = Linear(config.hidden_size, self.num_labels, bias=True, dtype=dtype)

    @property
    def max_position(self) -> int:
        return self.bert.max_position

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert(input_ids, positions, kv_caches, attn_metadata, token_type_ids)

    @torch.no_grad()
    def classifier_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [N, hidden] (any float dtype) -> logits [N, num_labels] float32."""
        return self.classifier(self.bert_pooler(pooled.to(self.dtype))).float()

    def kv_cache_spec(self) -> None:
        return None

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def rename(name: str) -> str | None:
            if name.startswith("bert.pooler."):
                return "bert_pooler." + name.removeprefix("bert.pooler.")
            return name
        return load_bert_weights(self, weights, rename)


def load_bert_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                      rename: Callable[[str], str | None]) -> set[str]:
    """Copy HF tensors into ``model``: ``rename`` maps an HF name to the model's name (None:
    skip it); ``gamma``/``beta`` are old names of LayerNorm weight/bias; Q/K/V load into
    ``qkv_proj``. ValueError on unknown names, shape mismatches or parameters left unloaded.
    Returns the HF names loaded."""
    params = dict(model.named_parameters())
    filled: set[str] = set()
    shards: dict[str, set[str]] = {}
    loaded: set[str] = set()
    unknown: list[str] = []
    for hf_name, tensor in weights:
        if hf_name.endswith(("position_ids", "token_type_ids")):
            continue  # buffers
        name = rename(hf_name)
        if name is None:
            continue
        if name.endswith(".gamma") or name.endswith(".beta"):
            name = name.rsplit(".", 1)[0] + (".weight" if name.endswith(".gamma") else ".bias")
        parts = name.split(".")
        if len(parts) >= 3 and parts[-2] in _QKV and parts[-3] == "self":
            module_name = ".".join(parts[:-2] + ["qkv_proj"])
            target = f"{module_name}.{parts[-1]}"
            if target not in params:
                unknown.append(hf_name)
                continue
            module = model.get_submodule(module_name)
            module.load_shard(parts[-1], _QKV[parts[-2]], tensor)
            seen = shards.setdefault(target, set())
            seen.add(_QKV[parts[-2]])
            if len(seen) == 3:
                filled.add(target)
        elif name in params:
            copy_checked(params[name], tensor, hf_name)
            filled.add(name)
        else:
            unknown.append(hf_name)
            continue
        loaded.add(hf_name)
    if unknown:
        raise ValueError(f"Unexpected weights in checkpoint for {type(model).__name__}: "
                         f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
    missing = sorted(set(params) - filled)
    if missing:
        raise ValueError(f"Weights missing from checkpoint: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}")
    return loaded
