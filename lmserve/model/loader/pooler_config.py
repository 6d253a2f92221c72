"""Resolve a pooling model's ``PoolerConfig`` from its checkpoint, as vLLM does.

Order (later wins, field by field): the model class's defaults (``default_pooling_type``,
normalize on), then a sentence-transformers layout (``modules.json`` -> the ``Pooling``
module's ``config.json``, a ``Normalize`` module), then the user's override.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lmserve.config import PoolerConfig

# sentence-transformers pooling modes (legacy boolean keys and the newer ``pooling_mode``
# names) -> our pooling types; None: a mode we cannot reproduce.
_LEGACY_MODES = {
    "pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}
_ST_MODES = {"cls": "CLS", "mean": "MEAN", "lasttoken": "LAST", "max": None,
             "mean_sqrt_len_tokens": None, "weightedmean": None}


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _module_kind(module: dict[str, Any]) -> str:
    """'sentence_transformers.models.Pooling' (or a newer module path) -> 'Pooling'."""
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _st_pooling_type(config: dict[str, Any]) -> str:
    """A sentence-transformers Pooling config -> CLS / MEAN / LAST; ValueError otherwise."""
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [mode for key, mode in _LEGACY_MODES.items() if config.get(key)]
    if len(modes) != 1:
        raise ValueError(f"sentence-transformers pooling with modes {modes} is not supported "
                         "(exactly one of cls, mean, lasttoken is)")
    ptype = _ST_MODES.get(modes[0])
    if ptype is None:
        raise ValueError(f"sentence-transformers pooling mode {modes[0]!r} is not supported "
                         "(supported: cls, mean, lasttoken)")
    if config.get("include_prompt") is False:
        raise ValueError("sentence-transformers pooling with include_prompt=false is not supported")
    return ptype


def sentence_transformers_pooler_config(model_dir: str | None) -> PoolerConfig | None:
    """The pooling of a sentence-transformers checkpoint (``modules.json``), or None if it has
    none. ``normalize`` is True exactly when a ``Normalize`` module is listed. A ``Dense``
    projection module is a ValueError (not supported)."""
    if not model_dir or not os.path.isfile(os.path.join(model_dir, "modules.json")):
        return None
    modules = _read_json(os.path.join(model_dir, "modules.json"))
    kinds = [_module_kind(m) for m in modules]
    if "Dense" in kinds:
        raise ValueError("sentence-transformers Dense projection modules are not supported")
    pooling_type = None
    for module, kind in zip(modules, kinds):
        if kind == "Pooling":
            path = os.path.join(model_dir, module.get("path", ""), "config.json")
            if os.path.isfile(path):
                pooling_type = _st_pooling_type(_read_json(path))
    return PoolerConfig(pooling_type=pooling_type, normalize="Normalize" in kinds)


def resolve_pooler_config(model_dir: str | None, model_cls: type, override: PoolerConfig | None) -> PoolerConfig:
    """-> a PoolerConfig with ``pooling_type`` and ``normalize`` set.

    Without ``modules.json``: ``model_cls.default_pooling_type`` and normalize True (vLLM's
    default for embedding models; classifiers never read it). With it: its Pooling module's mode
    (the class default when the module has no config) and normalize iff a Normalize module.
    ``override`` wins for every field it sets.
    """
    config = PoolerConfig(pooling_type=model_cls.default_pooling_type, normalize=True)
    config = config.merged(sentence_transformers_pooler_config(model_dir))
    return config.merged(override)


def sentence_transformers_max_seq_length(model_dir: str | None) -> int | None:
    """``max_seq_length`` from ``sentence_bert_config.json``, or None."""
    if not model_dir:
        return None
    path = os.path.join(model_dir, "sentence_bert_config.json")
    if not os.path.isfile(path):
        return None
    value = _read_json(path).get("max_seq_length")
    return int(value) if value else None
