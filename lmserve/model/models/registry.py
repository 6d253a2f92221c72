"""Hugging Face architecture name -> model class, and how it runs (generate or pooling).

Rules of ``resolve_model_class`` (vLLM's ``--runner`` / ``--convert``):
- ``*ForCausalLM`` architectures generate by default; with runner "pooling" (or convert
  "embed") the same class serves as a LAST-pooling embedding model (convert_type "embed").
  They have no classification head, so convert "classify" is a ValueError.
- Pooling-only architectures (``BertModel``, ``*ForSequenceClassification``) run as pooling
  models with convert_type "none"; runner "generate" is a ValueError.
The result is a fixed point: ``resolve_model_class(cfg, runner, convert)`` with the runner and
convert types it returned gives the same answer again.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmserve.model.models.bert import BertForSequenceClassification, BertModel
from lmserve.model.models.llama import LlamaForCausalLM, LlamaForSequenceClassification
# dense decoders beyond the Llama family: one file per model
from lmserve.model.models.gemma2 import Gemma2ForCausalLM, Gemma2ForSequenceClassification
from lmserve.model.models.gemma3 import Gemma3ForCausalLM, Gemma3ForSequenceClassification
from lmserve.model.models.gpt2 import GPT2ForSequenceClassification, GPT2LMHeadModel
from lmserve.model.models.gpt_neox import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification
from lmserve.model.models.opt import OPTForCausalLM, OPTForSequenceClassification
from lmserve.model.models.phi3 import Phi3ForCausalLM, Phi3ForSequenceClassification
from lmserve.model.models.moe import MoeForCausalLM, MoeForSequenceClassification

_GENERATE_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    # dense decoders beyond the Llama family
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "OPTForCausalLM": OPTForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
    "MixtralForCausalLM": MoeForCausalLM,
    "Qwen3MoeForCausalLM": MoeForCausalLM,
}
_POOLING_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "BertModel": BertModel,
    "BertForSequenceClassification": BertForSequenceClassification,
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
    "MistralForSequenceClassification": LlamaForSequenceClassification,
    "Qwen2ForSequenceClassification": LlamaForSequenceClassification,
    "Qwen3ForSequenceClassification": LlamaForSequenceClassification,
    # dense decoders beyond the Llama family
    "GPT2ForSequenceClassification": GPT2ForSequenceClassification,
    "OPTForSequenceClassification": OPTForSequenceClassification,
    "Gemma2ForSequenceClassification": Gemma2ForSequenceClassification,
    "Gemma3ForSequenceClassification": Gemma3ForSequenceClassification,
    "Phi3ForSequenceClassification": Phi3ForSequenceClassification,
    "GPTNeoXForSequenceClassification": GPTNeoXForSequenceClassification,
    "MixtralForSequenceClassification": MoeForSequenceClassification,
    "Qwen3MoeForSequenceClassification": MoeForSequenceClassification,
}
# For configs without `architectures` (e.g. built from a GGUF file by older transformers).
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "bert": "BertModel",
    "gpt2": "GPT2LMHeadModel",
    "opt": "OPTForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify")


def supported_architectures() -> list[str]:
    """Generative architectures first, then pooling ones, each sorted."""
    return sorted(_GENERATE_ARCHITECTURES) + sorted(_POOLING_ARCHITECTURES)


def architecture_of(hf_config: Any) -> str:
    """The config's first architecture, or the one implied by its ``model_type``; "" if neither."""
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return archs[0]
    return _MODEL_TYPES.get(getattr(hf_config, "model_type", ""), "")


def _supported_architecture(hf_config: Any) -> str:
    """The first of the config's architectures that is supported; ValueError naming them all."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", "") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf_config.model_type]]
    for arch in archs:
        if arch in _GENERATE_ARCHITECTURES or arch in _POOLING_ARCHITECTURES:
            return arch
    named = ", ".join(archs) or f"model_type={getattr(hf_config, 'model_type', None)!r}"
    raise ValueError(f"Model architecture {named} is not supported. "
                     f"Supported architectures: {', '.join(supported_architectures())}. "
                     "lmserve runs only its own model implementations: --trust-remote-code lets transformers "
                     "load a custom config and tokenizer, never remote modeling code. To add an architecture, "
                     "write one file in lmserve/model/models/ (a model class with forward, compute_logits, "
                     "kv_cache_spec and load_weights; decoder_base.py holds the shared pieces) and register "
                     "it in lmserve/model/models/registry.py.")


def resolve_model_class(hf_config: Any, runner: str = "auto",
                        convert: str = "auto") -> tuple[type[nn.Module], str, str]:
    """-> (model class, runner_type in {"generate", "pooling"}, convert_type in {"none", "embed"}).

    ValueError for an unknown architecture (naming the supported ones), an unknown runner or
    convert value, and the combinations the module docstring rules out.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if convert not in CONVERTS:
        raise ValueError(f"convert must be one of {', '.join(CONVERTS)}, got {convert!r}")
    arch = _supported_architecture(hf_config)
    if arch in _GENERATE_ARCHITECTURES:
        cls = _GENERATE_ARCHITECTURES[arch]
        if convert == "classify":
            raise ValueError(f"{arch} has no classification head weights, so it cannot be converted to a "
                             "classifier (--convert classify); use a *ForSequenceClassification checkpoint, "
                             "or --convert embed for embeddings.")
        if convert == "embed" and runner == "generate":
            raise ValueError("--convert embed makes a pooling model; it needs --runner pooling, not generate")
        if runner == "pooling" or convert == "embed":
            return cls, "pooling", "embed"
        return cls, "generate", "none"
    cls = _POOLING_ARCHITECTURES[arch]
    if runner == "generate":
        raise ValueError(f"{arch} is a pooling model (embeddings/classification/scores): it cannot "
                         "generate text. Use `--runner pooling` (or leave --runner auto).")
    kind = "embed" if "embed" in cls.pooling_tasks else "classify"
    if convert in ("embed", "classify") and convert != kind:
        raise ValueError(f"{arch} is {'an embedding' if kind == 'embed' else 'a classification'} model; "
                         f"it cannot be converted with --convert {convert}.")
    return cls, "pooling", "none"


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """Model class for a config (with its default runner); ValueError naming the supported
    architectures otherwise."""
    return resolve_model_class(hf_config)[0]
