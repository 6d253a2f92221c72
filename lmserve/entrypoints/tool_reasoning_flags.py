"""The serve flags of tool calling and reasoning (vLLM's names and defaults)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lmserve.reasoning import ReasoningParserManager
from lmserve.reasoning.config import ReasoningConfig
from lmserve.tool_parsers import ToolParserManager


def add_tool_reasoning_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tool calling and reasoning")
    g.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction, default=False,
                   help="Parse tool calls out of the generated text for tool_choice=\"auto\" (needs "
                        "--tool-call-parser).")
    g.add_argument("--tool-call-parser", default=None,
                   help="The tool-call parser: hermes, qwen3_json, qwen3_xml, qwen3_coder, llama3_json, "
                        "llama4_json, mistral, pythonic, deepseek_v3, or one a --tool-parser-plugin registers.")
    g.add_argument("--tool-parser-plugin", default="",
                   help="A Python file registering tool parsers with @ToolParserManager.register_module(name).")
    g.add_argument("--exclude-tools-when-tool-choice-none", action=argparse.BooleanOptionalAction, default=False,
                   help="Leave the tools out of the prompt when tool_choice is \"none\".")
    g.add_argument("--reasoning-parser", default="",
                   help="The reasoning parser: qwen3, deepseek_r1, deepseek_v3, mistral, or one a "
                        "--reasoning-parser-plugin registers.")
    g.add_argument("--reasoning-parser-plugin", default="",
                   help="A Python file registering reasoning parsers with "
                        "@ReasoningParserManager.register_module(name).")
    g.add_argument("--reasoning-config", default=None,
                   help='JSON: {"reasoning_start_str": ..., "reasoning_end_str": ...}, the strings '
                        "thinking_token_budget counts from and forces (default: the reasoning parser's).")


def check_tool_reasoning_args(args: argparse.Namespace) -> None:
    """Loads the plugins and checks the names; ValueError (a start-up error) when wrong."""
    if args.tool_parser_plugin:
        ToolParserManager.import_tool_parser(args.tool_parser_plugin)
    if args.reasoning_parser_plugin:
        ReasoningParserManager.import_reasoning_parser(args.reasoning_parser_plugin)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")
    if args.tool_call_parser and args.tool_call_parser not in ToolParserManager.list_registered():
        raise ValueError(f"invalid tool call parser: {args.tool_call_parser} (choose from "
                         f"{{{', '.join(ToolParserManager.list_registered())}}})")
    config: Any = args.reasoning_config
    if config is not None and not isinstance(config, ReasoningConfig):
        try:
            config = ReasoningConfig.from_flag(config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--reasoning-config is not valid JSON: {e}") from e
        args.reasoning_config = config
    if config is not None and config.reasoning_parser and not args.reasoning_parser:
        args.reasoning_parser = config.reasoning_parser
    if args.reasoning_parser and args.reasoning_parser not in ReasoningParserManager.list_registered():
        raise ValueError(f"invalid reasoning parser: {args.reasoning_parser} (choose from "
                         f"{{{', '.join(ReasoningParserManager.list_registered())}}})")
