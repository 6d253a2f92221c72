"""Rotary position embedding (RoPE), numerically matching Hugging Face transformers.

Supported types: default, linear, dynamic, yarn, llama3, longrope (read from transformers 5's
``config.rope_parameters``, also per layer type as Gemma 3 has them, or transformers 4's
``config.rope_scaling`` + ``rope_theta``). A partial rotary factor (GPT-NeoX, Phi-4-mini) gives
an embedding over the first ``rotary_dim`` dimensions of each head; the model rotates only those.
Inverse frequencies and the attention scaling come from transformers'
``ROPE_INIT_FUNCTIONS``, so they are HF's by construction. cos/sin are precomputed in fp32
for every position up to ``max_position`` and stored in the model dtype (HF casts them the
same way before applying them), so applying RoPE is one gather per forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmserve.model.backends.elementwise import NativeRope, TorchRope, rotate_neox

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The config's RoPE parameters as one flat dict with at least ``rope_type`` and ``rope_theta``
    (``layer_type``: the sub-dict of configs that have one per layer type, e.g. Gemma 3's)."""
    params = getattr(config, "rope_parameters", None)
    if layer_type is not None and isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if isinstance(params, dict) and ("rope_type" in params or "rope_theta" in params or "type" in params):
        out = dict(params)
    else:
        out = dict(getattr(config, "rope_scaling", None) or {})
    out.setdefault("rope_type", out.get("type", "default"))
    if out.get("rope_theta") is None:
        out["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return out


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    # Same arithmetic as HF's compute_default_rope_parameters.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / dim
    return 1.0 / (base ** exponents)


def partial_rotary_factor(config: Any, layer_type: str | None = None) -> float:
    """The fraction of each head's dimensions that RoPE rotates (1.0 for most models)."""
    factor = rope_parameters(config, layer_type).get("partial_rotary_factor")
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None)
    return float(factor) if factor is not None else 1.0


def compute_inv_freq(config: Any, head_dim: int, layer_type: str | None = None,
                     allow_partial: bool = False) -> tuple[torch.Tensor, float, int]:
    """-> (inv_freq [rotary_dim // 2] fp32 on CPU, attention_scaling, max_position of the cos/sin cache).
    ``rotary_dim`` is ``head_dim`` times the partial rotary factor, which must be 1 unless
    ``allow_partial`` (the caller then rotates only the first ``rotary_dim`` dimensions).

    For "dynamic" (NTK) scaling, HF recomputes frequencies from the longest sequence of each
    batch; a paged cache needs one fixed choice. Within ``max_position_embeddings`` dynamic
    scaling is a no-op in HF, so we use the unscaled frequencies there (exact HF match) and
    cover only that range.
    """
    params = rope_parameters(config, layer_type)
    rope_type = params["rope_type"]
    max_pos = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"RoPE type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    factor = partial_rotary_factor(config, layer_type)
    if factor != 1.0 and not allow_partial:
        raise NotImplementedError(f"partial_rotary_factor {factor} is not supported for this model")
    rotary_dim = int(head_dim * factor)
    if rope_type in ("default", "dynamic"):
        return _default_inv_freq(float(params["rope_theta"]), rotary_dim), 1.0, max_pos
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    with torch.device("cpu"):  # HF allocates on the default device; keep this on the host
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **kwargs)
    inv_freq = inv_freq.float().cpu()
    if inv_freq.numel() * 2 != rotary_dim:
        raise ValueError(f"RoPE produced {inv_freq.numel()} frequencies for rotary dim {rotary_dim}")
    if rope_type == "yarn":
        # YaRN extends the pretraining window by `factor`; the config's max_position_embeddings
        # is sometimes the original one, sometimes the extended one.
        orig = params.get("original_max_position_embeddings") or max_pos
        factor = params.get("factor") or 1.0
        max_pos = max(max_pos, int(math.ceil(orig * factor)))
    elif rope_type == "linear":
        max_pos = int(math.ceil(max_pos * float(params.get("factor") or 1.0)))
    return inv_freq, float(attention_scaling), max_pos


@dataclass(frozen=True)
class RotaryInputs:
    """One forward's RoPE rows, gathered once and applied in every layer.

    ``cos_sin`` [T, D]: ``cat(cos, sin)`` at each token's position; ``backend``: the embedding's
    backend (the torch ops, or the fused kernel computing the same ops with the same roundings)."""

    cos_sin: torch.Tensor
    backend: TorchRope | NativeRope

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] -> rotated (q, k), as ``RotaryEmbedding.apply``; when the
        embedding's rotary dimension R < D (partial rotary) only the first R of each head rotate."""
        rot = self.cos_sin.shape[-1]
        if rot == q.shape[-1]:
            return self.backend.apply(q, k, self.cos_sin)
        q_rot, k_rot = self.backend.apply(q[..., :rot], k[..., :rot], self.cos_sin)
        return torch.cat((q_rot, q[..., rot:]), dim=-1), torch.cat((k_rot, k[..., rot:]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Neox-style ("rotate half") RoPE with a precomputed cos/sin cache.

    Invariant: ``cos_sin_cache[p] == cat(cos(p * inv_freq), sin(p * inv_freq)) * attention_scaling``
    computed in fp32, stored in ``dtype``; positions must be < ``max_position``. ``backend`` (the
    torch ops when built, the plan's choice once loaded) goes into every ``RotaryInputs`` it makes.
    """

    backend: TorchRope | NativeRope

    def __init__(self, head_dim: int, max_position: int, inv_freq: torch.Tensor, attention_scaling: float,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.attention_scaling = attention_scaling
        self._inv_freq = inv_freq.float().cpu()  # host copy, to rebuild the cache (e.g. GGUF rope_freqs)
        self.backend = TorchRope()
        self.register_buffer("cos_sin_cache", self._build_cache(self._inv_freq, dtype), persistent=False)

    @classmethod
    def from_config(cls, config: Any, head_dim: int, dtype: torch.dtype, layer_type: str | None = None,
                    allow_partial: bool = False) -> "RotaryEmbedding":
        """The embedding of ``config`` (its ``layer_type`` sub-parameters if given). With
        ``allow_partial`` its ``head_dim`` is the rotary dimension (head_dim x partial factor).

        LongRoPE: transformers switches a whole sequence to the long factors once it grows past
        ``original_max_position_embeddings`` (re-rotating every key); a paged cache cannot re-rotate
        cached keys, so here positions below that length use the short factors and positions from
        it on the long ones (vLLM's compromise is per batch). Below it the result is HF's exactly."""
        inv_freq, scaling, max_pos = compute_inv_freq(config, head_dim, layer_type, allow_partial)
        rotary_dim = inv_freq.numel() * 2
        emb = cls(rotary_dim, max_pos, inv_freq, scaling, dtype)
        params = rope_parameters(config, layer_type)
        orig = params.get("original_max_position_embeddings")
        if params["rope_type"] == "longrope" and orig and int(orig) < max_pos:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            kwargs = {"layer_type": layer_type} if layer_type is not None else {}
            with torch.device("cpu"):
                long_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, torch.device("cpu"), seq_len=int(orig) + 1,
                                                               **kwargs)
            long_cache = emb._build_cache(long_freq.float().cpu(), dtype)
            emb.cos_sin_cache[int(orig):] = long_cache[int(orig):]
        return emb

    def _build_cache(self, inv_freq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Built on the host (the module moves with the model); immune to a default-device context.
        positions = torch.arange(self.max_position, dtype=torch.int64, device="cpu").float()  # [P]
        freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2] fp32, as HF computes it
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling  # [P, D]
        return cache.to(dtype)

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        """Divide the frequencies by per-dimension factors (llama.cpp's ``rope_freqs`` tensor,
        which GGUF files of Llama 3.1+ carry instead of llama3 rope-scaling parameters)."""
        factors = factors.float().cpu().reshape(-1)
        if factors.numel() != self._inv_freq.numel():
            raise ValueError(f"rope_freqs has {factors.numel()} entries, expected {self._inv_freq.numel()}")
        self._inv_freq = self._inv_freq / factors
        cache = self._build_cache(self._inv_freq, self.cos_sin_cache.dtype)
        self.cos_sin_cache = cache.to(self.cos_sin_cache.device)

    def inputs_for(self, positions: torch.Tensor) -> RotaryInputs:
        """positions [T] -> their ``RotaryInputs`` (one gather per forward)."""
        return RotaryInputs(self.cos_sin_cache.index_select(0, positions), self.backend)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] rotated by cos/sin [T, 1, D/2] (``elementwise.rotate_neox``)."""
        return rotate_neox(x, cos, sin)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] at ``positions`` [T] -> rotated (q, k)."""
        return self.inputs_for(positions).rotate(q, k)
