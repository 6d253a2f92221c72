"""Reasoning parsers (``--reasoning-parser NAME``), vLLM's registry and interface: a plugin
(``--reasoning-parser-plugin file.py``) does ``from lmserve.reasoning import ReasoningParser,
ReasoningParserManager`` and registers with ``@ReasoningParserManager.register_module("name")``."""

from lmserve.reasoning.abs_reasoning_parsers import ReasoningParser, ReasoningParserManager

__all__ = ["ReasoningParser", "ReasoningParserManager"]

_BUILTIN = {
    "qwen3": ("qwen3_reasoning_parser", "Qwen3ReasoningParser"),
    "deepseek_r1": ("deepseek_r1_reasoning_parser", "DeepSeekR1ReasoningParser"),
    "deepseek_v3": ("deepseek_v3_reasoning_parser", "DeepSeekV3ReasoningParser"),
    "mistral": ("mistral_reasoning_parser", "MistralReasoningParser"),
}
for _name, (_module, _cls) in _BUILTIN.items():
    ReasoningParserManager.register_lazy_module(_name, f"lmserve.reasoning.{_module}", _cls)
