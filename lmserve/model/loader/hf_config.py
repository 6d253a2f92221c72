"""Read a model's Hugging Face config from a directory or a GGUF file."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

_DTYPE_NAMES = {
    "float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _fix_gguf_config(config: Any, path: str) -> None:
    """Fill in what transformers' GGUF config reader leaves out or gets wrong for our models."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from lmserve.model.loader.gguf_loader import read_gguf_header

    header = read_gguf_header(path)
    arch = header.metadata.get("general.architecture", "")
    meta = {k[len(arch) + 1:]: v for k, v in header.metadata.items() if k.startswith(arch + ".")}
    has_output = "output.weight" in header.tensor_names
    if not getattr(config, "architectures", None):
        cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if cls_name:
            config.architectures = [cls_name]
    config.tie_word_embeddings = not has_output
    # Qwen3's head_dim is not hidden_size / num_heads; GGUF keeps it as attention.key_length.
    key_length = meta.get("attention.key_length")
    if key_length and key_length != getattr(config, "head_dim", None):
        config.head_dim = int(key_length)
    # llama.cpp applies no sliding window to llama/mistral; MistralConfig defaults to 4096.
    if config.model_type == "mistral":
        config.sliding_window = None
    scaling = meta.get("rope.scaling.type")
    if scaling in ("linear", "yarn") and float(meta.get("rope.scaling.factor") or 1.0) != 1.0:
        from lmserve.model.layers.rotary import rope_parameters

        params = rope_parameters(config)
        if params.get("rope_type", "default") == "default":
            params.update(rope_type=scaling, factor=float(meta["rope.scaling.factor"]))
            if meta.get("rope.scaling.original_context_length"):
                params["original_max_position_embeddings"] = int(meta["rope.scaling.original_context_length"])
            if hasattr(config, "rope_parameters"):
                config.rope_parameters = params
            else:  # transformers 4
                config.rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}


def load_hf_config(model_dir: str, gguf_file: str | None = None) -> Any:
    """-> transformers.PretrainedConfig. For a GGUF file the config comes from its metadata,
    with ``architectures`` set (e.g. ["LlamaForCausalLM"]) and ``tie_word_embeddings`` true
    exactly when the file has no ``output.weight``."""
    from transformers import AutoConfig

    if gguf_file:
        config = AutoConfig.from_pretrained(model_dir, gguf_file=gguf_file)
        _fix_gguf_config(config, os.path.join(model_dir, gguf_file))
        return config
    return AutoConfig.from_pretrained(model_dir)


def checkpoint_dtype(hf_config: Any, model_dir: str | None = None, gguf_file: str | None = None) -> torch.dtype | None:
    """The dtype the weights are stored in, for ``--dtype auto``; None if unknown.

    GGUF files are (mostly) quantized and dequantize to float32, so they report float32
    (``resolve_dtype`` then picks bf16 on CPU, fp16 on CUDA).
    """
    if gguf_file:
        return torch.float32
    # ``dtype`` only: transformers maps a config.json's ``torch_dtype`` onto it, and reading the
    # ``torch_dtype`` attribute logs a deprecation warning (the raw file is read below instead).
    value = getattr(hf_config, "dtype", None)
    if value is None and model_dir and os.path.isfile(os.path.join(model_dir, "config.json")):
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        value = raw.get("dtype") or raw.get("torch_dtype")
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        return _DTYPE_NAMES.get(value.replace("torch.", ""))
    return None
