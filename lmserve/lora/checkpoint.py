"""PEFT LoRA checkpoints (``adapter_config.json`` + ``adapter_model.safetensors``) read into a
``LoRAAdapter``: per projection module of the model, the stacked A and scaled B^T its delta needs.

Contract of a ``LoRAAdapter``: for a model module named ``key`` (``model.layers.3.self_attn.qkv_proj``,
the merged layers of ``models/llama.py``), ``deltas[key] = LayerDelta(a, b)`` with ``a`` [C, in] and
``b`` [C, out] such that the module's output for an input row ``x`` is ``x @ W^T + (x @ a^T) @ b``.
A merged module (Q|K|V, gate|up) stacks its targeted shards' A rows; each shard's B^T occupies only
that shard's output columns (zeros elsewhere), and ``blocks`` names where: ``(row0, row1, col0, col1)``
per shard, ``b`` being zero outside those blocks, so the delta computes only the blocks. The scale (``lora_alpha / r``, or ``lora_alpha /
sqrt(r)`` with ``use_rslora``; ``alpha_pattern`` per module) is folded into ``b`` in float32 before
the cast to the LoRA dtype. Modules the adapter does not target have no entry.

Everything a checkpoint may hold that this does not compute is refused with a ValueError naming it
(other target modules, DoRA, LoRA biases, ``modules_to_save``, ranks above ``max_lora_rank``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# HF projection -> (model module under the decoder layer, shard of a merged module or None)
_MODULE_OF = {"q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
              "v_proj": ("self_attn.qkv_proj", "v"), "o_proj": ("self_attn.o_proj", None),
              "gate_proj": ("mlp.gate_up_proj", "gate"), "up_proj": ("mlp.gate_up_proj", "up"),
              "down_proj": ("mlp.down_proj", None)}
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A|lora_B)"
                  r"(?:\.default)?\.weight$")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LayerDelta:
    a: torch.Tensor  # [C, in_features]
    b: torch.Tensor  # [C, out_features]: B^T times the scale
    # (row0, row1, col0, col1) per shard: b is zero outside b[row0:row1, col0:col1]; None: one block, all of b
    blocks: tuple[tuple[int, int, int, int], ...] | None = None

    def nonzero_blocks(self) -> tuple[tuple[int, int, int, int], ...]:
        return self.blocks if self.blocks is not None else ((0, self.a.shape[0], 0, self.b.shape[1]),)


@dataclass(eq=False)
class LoRAAdapter:
    """A loaded adapter (see the module docstring). Immutable once built: requests that run with
    it hold a reference, so it stays valid while they run even after it leaves the cache."""

    lora_id: int
    name: str
    path: str
    rank: int  # the largest rank of its modules
    deltas: dict[str, LayerDelta] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(d.a.numel() * d.a.element_size() + d.b.numel() * d.b.element_size()
                   for d in self.deltas.values())


def _geometry(hf_config: Any) -> tuple[int, dict[str, tuple[int, dict[str, tuple[int, int]]]]]:
    """(number of layers, {module under a layer: (in_features, {shard or "": (first col, end col)})})."""
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    q, kv, inter = heads * head_dim, kv_heads * head_dim, hf_config.intermediate_size
    return hf_config.num_hidden_layers, {
        "self_attn.qkv_proj": (hidden, {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}),
        "self_attn.o_proj": (q, {"": (0, hidden)}),
        "mlp.gate_up_proj": (hidden, {"gate": (0, inter), "up": (inter, 2 * inter)}),
        "mlp.down_proj": (inter, {"": (0, hidden)}),
    }


def read_adapter_config(path: str) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``, checked for what this engine cannot compute."""
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"No {ADAPTER_CONFIG} in the LoRA adapter directory {path!r}")
    with open(cfg_path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{ADAPTER_CONFIG} of {path!r} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{ADAPTER_CONFIG} of {path!r} must be a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"Only LoRA adapters are supported, not peft_type {peft_type}")
    if cfg.get("use_dora"):
        raise ValueError("DoRA adapters (use_dora) are not supported")
    if cfg.get("bias", "none") not in ("none", None):
        raise ValueError(f"LoRA adapters with biases (bias={cfg.get('bias')!r}) are not supported")
    if cfg.get("modules_to_save"):
        raise ValueError(f"LoRA adapters with modules_to_save ({cfg['modules_to_save']}) are not supported: only "
                         f"the projections {', '.join(SUPPORTED_TARGET_MODULES)} may be adapted")
    if cfg.get("fan_in_fan_out"):
        raise ValueError("fan_in_fan_out LoRA adapters (Conv1D layouts) are not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        bad = sorted({str(t).rsplit(".", 1)[-1] for t in targets} - set(SUPPORTED_TARGET_MODULES))
        if bad:
            raise ValueError(f"LoRA target modules {bad} are not supported; supported: "
                             f"{', '.join(SUPPORTED_TARGET_MODULES)}")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{ADAPTER_CONFIG}: {key} must be a positive number, got {v!r}")
    return cfg


def _alpha_for(cfg: dict[str, Any], module_name: str) -> float:
    """``alpha_pattern`` entries match a module name's suffix (PEFT's rule), else ``lora_alpha``."""
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?(?:{pattern})$", module_name):
            return float(alpha)
    return float(cfg["lora_alpha"])


def load_adapter(path: str, lora_id: int, name: str, hf_config: Any, max_rank: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> LoRAAdapter:
    """Reads and checks a PEFT adapter for a Llama-family model of ``hf_config``; ValueError on
    anything unsupported or malformed (naming it)."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(path)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_path):
        raise ValueError(f"No {ADAPTER_WEIGHTS} in the LoRA adapter directory {path!r} (only safetensors "
                         "checkpoints are loaded)")
    tensors = load_file(weights_path)
    num_layers, geometry = _geometry(hf_config)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(3) not in _MODULE_OF:
            module = m.group(3) if m else key
            raise ValueError(f"LoRA adapter {name!r}: unsupported target module in {key!r} ({module}); supported: "
                             f"{', '.join(SUPPORTED_TARGET_MODULES)}")
        layer = int(m.group(1))
        if layer >= num_layers:
            raise ValueError(f"LoRA adapter {name!r}: {key} names layer {layer}, the model has {num_layers}")
        pairs.setdefault((layer, m.group(3)), {})[m.group(4)] = t
    if not pairs:
        raise ValueError(f"LoRA adapter {name!r} holds no LoRA weights")
    use_rslora = bool(cfg.get("use_rslora"))
    # per model module: list of (shard, A [r, in], B^T scaled [r, out-of-shard])
    parts: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    max_seen = 0
    for (layer, proj), ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA adapter {name!r}: layer {layer} {proj} lacks its lora_A or lora_B weight")
        a, b = ab["lora_A"].float(), ab["lora_B"].float()
        rank = a.shape[0]
        if rank > max_rank:
            raise ValueError(f"LoRA rank {rank} of adapter {name!r} is greater than max_lora_rank {max_rank}: "
                             "raise --max-lora-rank")
        sub, shard = _MODULE_OF[proj]
        in_features, shards = geometry[sub]
        lo, hi = shards[shard or ""]
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (hi - lo, rank):
            raise ValueError(f"LoRA adapter {name!r}: layer {layer} {proj} has A {tuple(a.shape)} and B "
                             f"{tuple(b.shape)}; the model needs A [r, {in_features}] and B [{hi - lo}, r]")
        hf_name = f"model.layers.{layer}.{sub.split('.')[0]}.{proj}"
        alpha = _alpha_for(cfg, hf_name)
        scale = alpha / (math.sqrt(rank) if use_rslora else rank)
        parts.setdefault(f"model.layers.{layer}.{sub}", []).append((shard or "", a, b.t() * scale))
        max_seen = max(max_seen, rank)
    deltas: dict[str, LayerDelta] = {}
    for module_key, entries in parts.items():
        sub = module_key.split(".", 3)[3]
        in_features, shards = geometry[sub]
        out_features = max(hi for _, hi in shards.values())
        a_rows, b_rows, blocks = [], [], []
        for shard, a, bt in entries:
            lo, hi = shards[shard]
            full = torch.zeros(bt.shape[0], out_features)
            full[:, lo:hi] = bt
            row0 = sum(r.shape[0] for r in a_rows)
            blocks.append((row0, row0 + a.shape[0], lo, hi))
            a_rows.append(a)
            b_rows.append(full)
        deltas[module_key] = LayerDelta(torch.cat(a_rows).to(device, dtype).contiguous(),
                                        torch.cat(b_rows).to(device, dtype).contiguous(), tuple(blocks))
    return LoRAAdapter(lora_id, name, path, max_seen, deltas)
