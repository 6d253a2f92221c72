"""Tool-call parsers (``--tool-call-parser NAME``), vLLM's registry and interface.

``from lmserve.tool_parsers import ToolParser, ToolParserManager`` is the import a plugin
(``--tool-parser-plugin file.py``) uses, with ``@ToolParserManager.register_module("name")``;
the protocol types a parser returns are importable from here too.
"""

from lmserve.entrypoints.openai.protocol_responses import (DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                                          ExtractedToolCallInformation, FunctionCall, ToolCall,
                                                          make_tool_call_id)
from lmserve.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager

__all__ = ["DeltaFunctionCall", "DeltaMessage", "DeltaToolCall", "ExtractedToolCallInformation", "FunctionCall",
           "ToolCall", "ToolParser", "ToolParserManager", "make_tool_call_id"]

# name -> (module in this package, class): imported on first use.
_BUILTIN = {
    "hermes": ("hermes_tool_parser", "Hermes2ProToolParser"),
    "qwen3_json": ("hermes_tool_parser", "Hermes2ProToolParser"),
    "qwen3_xml": ("qwen3_xml_tool_parser", "Qwen3XMLToolParser"),
    "qwen3_coder": ("qwen3_xml_tool_parser", "Qwen3XMLToolParser"),
    "llama3_json": ("llama_tool_parser", "Llama3JsonToolParser"),
    "llama4_json": ("llama_tool_parser", "Llama3JsonToolParser"),
    "mistral": ("mistral_tool_parser", "MistralToolParser"),
    "pythonic": ("pythonic_tool_parser", "PythonicToolParser"),
    "deepseek_v3": ("deepseekv3_tool_parser", "DeepSeekV3ToolParser"),
}
for _name, (_module, _cls) in _BUILTIN.items():
    ToolParserManager.register_lazy_module(_name, f"lmserve.tool_parsers.{_module}", _cls)
