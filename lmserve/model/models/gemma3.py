"""Gemma 3 text (``Gemma3ForCausalLM``, ``Gemma3ForSequenceClassification``): Gemma 2's block
(``gemma2.py``) plus per-head RMSNorm of q and k ((1 + w) weights, before RoPE) and one RoPE per
layer type: sliding-window layers use the local base frequency (``rope_parameters
["sliding_attention"]``), global layers their own (possibly scaled) one. Soft-capping is off in
the released configs but honoured when set."""

from __future__ import annotations

from lmserve.model.models.decoder_base import sequence_classifier
from lmserve.model.models.gemma2 import Gemma2ForCausalLM, GemmaModel


class Gemma3TextModel(GemmaModel):
    qk_norm = True


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text causal LM (module docstring); checkpoint names as Gemma 2's."""

    model_class = Gemma3TextModel


Gemma3ForSequenceClassification = sequence_classifier(Gemma3ForCausalLM)
