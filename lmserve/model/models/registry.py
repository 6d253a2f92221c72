"""Hugging Face architecture name -> model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from lmserve.model.models.llama import LlamaForCausalLM

_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}
# For configs without `architectures` (e.g. built from a GGUF file by older transformers).
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def architecture_of(hf_config: Any) -> str:
    """The config's first architecture, or the one implied by its ``model_type``; "" if neither."""
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return archs[0]
    return _MODEL_TYPES.get(getattr(hf_config, "model_type", ""), "")


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """Model class for a config; ValueError naming the supported architectures otherwise."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", "") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf_config.model_type]]
    for arch in archs:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    named = ", ".join(archs) or f"model_type={getattr(hf_config, 'model_type', None)!r}"
    raise ValueError(f"Model architecture {named} is not supported. "
                     f"Supported architectures: {', '.join(supported_architectures())}.")
