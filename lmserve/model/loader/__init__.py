"""Build a model and load its weights (safetensors, GGUF, or dummy random weights)."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from lmserve.config import ModelConfig
from lmserve.model.loader.gguf_loader import iter_gguf_weights
from lmserve.model.loader.hf_config import checkpoint_dtype, load_hf_config
from lmserve.model.loader.resolve import default_model, resolve_model
from lmserve.model.loader.safetensors_loader import iter_checkpoint_weights
from lmserve.model.backends.plan import BackendPlan
from lmserve.model.layers.pooler import Pooler
from lmserve.model.loader.binding import bind_backends
from lmserve.model.models.registry import resolve_model_class

logger = logging.getLogger(__name__)

__all__ = ["get_model", "resolve_model", "default_model", "load_hf_config", "checkpoint_dtype",
           "initialize_dummy_weights", "keeps_gguf_quantized"]


def keeps_gguf_quantized(model_config: ModelConfig, device: torch.device | str) -> bool:
    """Whether a GGUF file's Q4_0/Q4_1/Q8_0 matrices stay quantized at run time (on CPU only):
    in bf16 unless quantization is "none"; in fp32 only when asked for (quantization "gguf"),
    because the int kernel rounds an fp32 model's rows to bf16, and a dense fp32 model equals
    transformers' token for token."""
    if not model_config.gguf_file or model_config.quantization == "none" or torch.device(device).type != "cpu":
        return False
    if model_config.dtype == torch.bfloat16:
        return True
    return model_config.dtype == torch.float32 and model_config.quantization == "gguf"


@torch.no_grad()
def initialize_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Deterministic random weights (load_format="dummy"): matrices ~ N(0, 0.02), norm weights 1,
    biases 0, so activations stay well scaled and outputs are not degenerate."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.02
            param.copy_(values)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)


def get_model(model_config: ModelConfig, device: torch.device | str) -> nn.Module:
    """Build the model for ``model_config.hf_config`` in ``model_config.dtype`` on ``device``,
    load its weights per ``load_format`` ("auto": GGUF if ``gguf_file`` else safetensors/bin;
    "dummy": seeded random), and return it in eval mode with gradients off. A GGUF file's
    Q4_0/Q4_1/Q8_0 weights stay quantized when ``keeps_gguf_quantized`` says so.

    The class follows ``model_config.runner_type`` / ``convert_type`` (``resolve_model_class``);
    a pooling model gets ``model.pooler``, a ``Pooler`` over ``model_config.pooler_config`` with
    the model's ``classifier_head`` (if any). Then every layer gets its compute backend, chosen
    once by a ``BackendPlan`` for this device, dtype and CPU (``binding.bind_backends``; the
    choices are logged as one table)."""
    device = torch.device(device)
    cls, _, _ = resolve_model_class(model_config.hf_config, model_config.runner_type, model_config.convert_type)
    with torch.device(device):
        model = cls(model_config.hf_config, model_config.dtype)
    fmt = model_config.load_format
    if fmt == "dummy":
        initialize_dummy_weights(model, model_config.seed)
    elif model_config.gguf_file and fmt in ("auto", "gguf"):
        path = os.path.join(model_config.model_path, model_config.gguf_file)
        model.load_weights(iter_gguf_weights(path, model_config.hf_config,
                                             keep_quantized=keeps_gguf_quantized(model_config, device)))
    elif fmt == "gguf":
        raise ValueError("load_format='gguf' but the model has no GGUF file")
    elif fmt in ("auto", "safetensors", "pt"):
        if model_config.gguf_file:
            raise ValueError(f"load_format={fmt!r} but the model is a GGUF file ({model_config.gguf_file})")
        model.load_weights(iter_checkpoint_weights(model_config.model_path))
    else:
        raise ValueError(f"Unknown load_format {fmt!r}; choose from auto, safetensors, gguf, dummy")
    if model_config.is_pooling:
        model.pooler = Pooler(model_config.pooler_config, getattr(model, "classifier_head", None),
                              getattr(model, "num_labels", None))
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    table = bind_backends(model, BackendPlan.for_device(device, model_config.dtype))
    logger.info("%s", table.format())
    return model
