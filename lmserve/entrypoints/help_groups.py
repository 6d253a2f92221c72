"""``lmserve serve --help`` laid out as ``vllm serve --help``: vLLM's groups, in vLLM's order.

``vllm_serve_flags.json`` (beside this module, written from vLLM's own parser by
``tools/dump_vllm_serve_flags.py``) names each vLLM flag's group (``Frontend``, ``ModelConfig``, ...).
``regroup_as_vllm`` moves every option of a finished parser into the group vLLM gives it; options vLLM
does not have go to a last group, ``lmserve``. Each option's help ends with its default.

As in vLLM, ``--help=all`` prints every group, ``--help=<group>`` one group (case-insensitive) and
``--help=<text>`` the options whose names contain the text (``_`` or ``-``); a plain ``--help``
prints every group too, since the help text and default of each flag is what a newcomer looks for.
"""

from __future__ import annotations

import argparse
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

VLLM_FLAGS_JSON = Path(__file__).with_name("vllm_serve_flags.json")
LMSERVE_GROUP = "lmserve"
HELP_EPILOG = ("For one group:  lmserve serve --help=ModelConfig   (case-insensitive)\n"
               "For a flag:     lmserve serve --help=max-model-len (_ or - accepted)")


@cache
def vllm_flag_groups() -> tuple[dict[str, tuple[str, str]], tuple[str, ...]]:
    """``({option string: (vLLM group, vLLM help)}, groups in vLLM's order)`` from vLLM 0.32's parser."""
    data = json.loads(VLLM_FLAGS_JSON.read_text())
    by_flag: dict[str, tuple[str, str]] = {}
    for flag in data["flags"]:
        for opt in (flag["flag"], *flag.get("aliases", ())):
            by_flag[opt] = (flag["group"], flag.get("help") or "")
    return by_flag, tuple(dict.fromkeys(flag["group"] for flag in data["flags"]))


_STATES_DEFAULT = re.compile(r"\(default|default(?:s)?\s*(?:[:=]|is\b|value)", re.IGNORECASE)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.help is argparse.SUPPRESS or not action.option_strings:
            return text
        if "%(default)" in text or _STATES_DEFAULT.search(text) or action.default in (None, argparse.SUPPRESS):
            return text
        if isinstance(action, argparse._StoreTrueAction) and action.default is False:  # noqa: SLF001
            return text
        return f"{text} (default: %(default)s)".strip()


def regroup_as_vllm(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Moves every option of ``parser`` into its vLLM group (last: ``lmserve``, options vLLM lacks).

    Call once, after the last ``add_argument``: the parser keeps its actions, only their grouping
    (what ``--help`` prints) changes. An option lmserve gives no help text of its own shows vLLM's:
    it is the same flag, with vLLM's meaning."""
    by_flag, order = vllm_flag_groups()
    positional = [a for a in parser._actions if not a.option_strings]  # noqa: SLF001
    placed: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public regrouping
        if not action.option_strings:
            continue
        vllm = next((by_flag[o] for o in action.option_strings if o in by_flag), (LMSERVE_GROUP, ""))
        group, vllm_help = vllm
        if action.help is None and vllm_help:
            action.help = vllm_help  # as vLLM's parser holds it: % already escaped
        placed.setdefault(group, []).append(action)
    parser._action_groups = []  # noqa: SLF001
    if positional:
        parser.add_argument_group("positional arguments")._group_actions.extend(positional)  # noqa: SLF001
    for title in (*order, LMSERVE_GROUP):
        if title in placed:
            group = parser.add_argument_group(title if title != "options" else "general")
            group._group_actions.extend(placed[title])  # noqa: SLF001
    parser.formatter_class = DefaultsHelpFormatter
    parser.usage = "%(prog)s [MODEL] [options]"
    parser.epilog = HELP_EPILOG
    return parser


def filtered_help(parser: argparse.ArgumentParser, keyword: str) -> str:
    """The text of ``--help=<keyword>``: all groups, one group, or the options matching a name."""
    keyword = keyword.strip().lower().replace("_", "-")
    if keyword in ("", "all"):
        return parser.format_help()
    formatter = parser._get_formatter()  # noqa: SLF001
    for group in parser._action_groups:  # noqa: SLF001
        if (group.title or "").lower() == keyword:
            return _section(formatter, group.title or "", group._group_actions)  # noqa: SLF001
    matched = [a for a in parser._actions  # noqa: SLF001
               if any(keyword.lstrip("-") in opt.lower() for opt in a.option_strings)
               and a.help is not argparse.SUPPRESS]
    if matched:
        return _section(formatter, f"options matching {keyword!r}", matched)
    groups = ", ".join(g.title or "" for g in parser._action_groups if g._group_actions)  # noqa: SLF001
    return f"No group or option matches {keyword!r}. Groups: {groups}. Use --help=all for every option.\n"


def _section(formatter: Any, title: str, actions: list[argparse.Action]) -> str:
    formatter.start_section(title)
    formatter.add_arguments(actions)
    formatter.end_section()
    return formatter.format_help()


def help_keyword(argv: list[str]) -> str | None:
    """The ``X`` of a ``--help=X`` in ``argv`` (before any ``--``), else None."""
    for token in argv:
        if token == "--":
            return None
        if token.startswith("--help="):
            return token.split("=", 1)[1]
    return None
