"""Phi-3 / Phi-3.5 / Phi-4-mini (``Phi3ForCausalLM``, ``Phi3ForSequenceClassification``): the
Llama block with checkpoint-fused ``qkv_proj`` and ``gate_up_proj`` (loaded as they are into the
merged layers, so the Llama family's native decode step applies), LongRoPE ("su"/"longrope")
scaling (``rotary.py``), an optional partial rotary factor (Phi-4-mini) and the config's sliding
window on every layer."""

from __future__ import annotations

from lmserve.model.models.llama import LlamaForCausalLM, LlamaForSequenceClassification


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 causal LM (module docstring)."""


class Phi3ForSequenceClassification(LlamaForSequenceClassification):
    """Phi-3 with a ``score`` head."""
