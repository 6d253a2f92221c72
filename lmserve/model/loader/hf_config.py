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


def _fix_gguf_config(config: Any, path: str) -> Any:
    """Fill in what transformers' GGUF config reader leaves out or gets wrong for our models;
    returns the config (a new one for a Mixtral file, see ``moe_gguf_config``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from lmserve.model.loader.gguf_loader import read_gguf_header
    from lmserve.model.loader.moe_gguf_config import moe_gguf_config

    header = read_gguf_header(path)
    arch = header.metadata.get("general.architecture", "")
    meta = {k[len(arch) + 1:]: v for k, v in header.metadata.items() if k.startswith(arch + ".")}
    has_output = "output.weight" in header.tensor_names
    if not getattr(config, "architectures", None):
        cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if cls_name:
            config.architectures = [cls_name]
    config.tie_word_embeddings = not has_output
    _fix_gguf_architecture(config, arch, meta, {t.name: t.dims for t in header.tensors})
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
    return moe_gguf_config(config, arch, meta, header.tensor_names)


def _fix_gguf_architecture(config: Any, arch: str, meta: dict[str, Any], dims: dict[str, tuple[int, ...]]) -> None:
    """What transformers' GGUF reader leaves out for the non-Llama architectures (``meta``: the
    architecture's keys without their prefix; ``dims``: tensor name -> GGUF dims)."""
    if "token_embd.weight" in dims:  # transformers may fall back to the config class's default
        config.vocab_size = int(dims["token_embd.weight"][1])
    if meta.get("attention.sliding_window") and hasattr(config, "sliding_window"):
        config.sliding_window = int(meta["attention.sliding_window"])
    rope_dims = meta.get("rope.dimension_count")
    if arch == "phi3" and rope_dims:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if int(rope_dims) != head_dim:  # Phi-4-mini: partial rotary
            from lmserve.model.layers.rotary import rope_parameters

            params = rope_parameters(config)
            params["partial_rotary_factor"] = int(rope_dims) / head_dim
            config.rope_parameters = params
    if arch == "gpt2":
        config.n_positions = int(meta.get("context_length") or config.n_positions)
        config.n_inner = int(meta.get("feed_forward_length") or 4 * config.n_embd)
    elif arch in ("gemma2", "gemma3"):
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            setattr(config, key, float(meta[key]) if meta.get(key) else None)
        # llama.cpp's attention scale: 1/sqrt(head_dim), but hidden/heads for the 27B models
        # (46 layers for Gemma 2, 62 for Gemma 3), as their HF configs' query_pre_attn_scalar
        big = config.num_hidden_layers == (46 if arch == "gemma2" else 62)
        config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads if big else config.head_dim
        if arch == "gemma3" and meta.get("rope.freq_base"):
            params = getattr(config, "rope_parameters", None)
            if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
                params["full_attention"]["rope_theta"] = float(meta["rope.freq_base"])


def load_hf_config(model_dir: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> Any:
    """-> transformers.PretrainedConfig. For a GGUF file the config comes from its metadata,
    with ``architectures`` set (e.g. ["LlamaForCausalLM"]) and ``tie_word_embeddings`` true
    exactly when the file has no ``output.weight``. ``trust_remote_code`` is transformers' (a
    config class shipped with the checkpoint); the model itself is always lmserve's own."""
    from transformers import AutoConfig

    if gguf_file:
        config = AutoConfig.from_pretrained(model_dir, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
        return _fix_gguf_config(config, os.path.join(model_dir, gguf_file))
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


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
