"""``ToolParser`` (turns a model's generated text into OpenAI tool calls) and
``ToolParserManager`` (the name -> parser registry behind ``--tool-call-parser``), with vLLM's
interface, so a parser written for vLLM ports by changing its imports::

    from vllm.tool_parsers import ToolParser, ToolParserManager     ->  from lmserve.tool_parsers import ...
    from vllm.entrypoints.openai.protocol import DeltaMessage, ...  ->  from lmserve.tool_parsers import ...

A parser instance serves one choice of one request (streaming state lives on it).

The registry is class-level, as vLLM's: ``@ToolParserManager.register_module("name")`` in a
``--tool-parser-plugin`` file must reach the server's lookup. It only ever grows (built-ins at
import, plugins at start-up), before any request is served.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from lmserve.entrypoints.openai.protocol_responses import DeltaMessage, ExtractedToolCallInformation
from lmserve.parser_registry import ParserRegistry, import_plugin_file


class ToolParser:
    """Base class of tool parsers (vLLM's contract).

    ``extract_tool_calls(model_output, request)``: the whole output -> ``ExtractedToolCallInformation``.
    ``extract_tool_calls_streaming(previous_text, current_text, delta_text, previous_token_ids,
    current_token_ids, delta_token_ids, request)``: called once per generated delta with the text so
    far; returns the delta to send (content and/or tool-call pieces) or None.
    ``finish_streaming(current_text, request)`` (lmserve's addition, default None): called once when
    the output ends, to send what was held back while it could still have become a tool call.

    ``supports_required_and_named`` is kept for vLLM plugins; lmserve reads every "required" / named
    ``tool_choice`` output itself, as the JSON it constrains the model to, whatever the parser.
    """

    supports_required_and_named: bool = True

    def __init__(self, tokenizer: Any, tools: list[Any] | None = None) -> None:
        self.prev_tool_call_arr: list[dict] = []
        self.current_tool_id: int = -1
        self.current_tool_name_sent: bool = False
        self.streamed_args_for_tool: list[str] = []
        self.model_tokenizer = tokenizer
        self.tools: list[Any] = list(tools or [])

    @cached_property
    def vocab(self) -> dict[str, int]:
        return self.model_tokenizer.get_vocab() if self.model_tokenizer is not None else {}

    def adjust_request(self, request: Any) -> Any:
        """A hook to change the request before generation (vLLM's); the default changes nothing."""
        return request

    def get_remaining_unstreamed_args(self) -> str:
        """Argument text of the last tool call parsed but not streamed yet (vLLM's helper)."""
        if not self.prev_tool_call_arr:
            return ""
        index = len(self.prev_tool_call_arr) - 1
        args = self.prev_tool_call_arr[index].get("arguments", {})
        expected = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        actual = self.streamed_args_for_tool[index] if index < len(self.streamed_args_for_tool) else ""
        return expected[len(actual):] if expected.startswith(actual) else ""

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        raise NotImplementedError("ToolParser.extract_tool_calls has not been implemented")

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int], request: Any) -> DeltaMessage | None:
        raise NotImplementedError("ToolParser.extract_tool_calls_streaming has not been implemented")

    def finish_streaming(self, current_text: str, request: Any) -> DeltaMessage | None:
        return None


class ToolParserManager(ParserRegistry):
    """The registry of tool parsers: ``register_module`` (a decorator, or with ``module=``),
    ``register_lazy_module`` (imported on first use), ``get_tool_parser``, ``list_registered``,
    ``import_tool_parser`` (a plugin file)."""

    tool_parsers: dict[str, type[ToolParser]] = {}
    lazy_parsers: dict[str, tuple[str, str]] = {}
    _registered = tool_parsers
    _base = ToolParser
    _label = "Tool parser"

    @classmethod
    def get_tool_parser(cls, name: str) -> type[ToolParser]:
        return cls._lookup(name)

    @classmethod
    def import_tool_parser(cls, plugin_path: str) -> None:
        import_plugin_file(plugin_path, "--tool-parser-plugin")

