"""``pythonic``: tool calls as a Python list of calls (Llama 3.2 / 4, ToolACE, ...)::

    [get_weather(city="Paris", days=3), get_time(zone='CET')]

Keyword arguments only; values are Python literals (str, int, float, bool, None, lists, dicts,
and the JSON spellings true/false/null). The output is a tool-call list only when it begins
(after whitespace) with ``[``; it then holds nothing else (no content). A call is sent, whole,
once its closing parenthesis arrives.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from lmserve.tool_parsers.partial_json import canonical_json
from lmserve.tool_parsers.scanning import Scan, ScannedCall, ScanningToolParser

_JSON_NAMES = {"null": None, "true": True, "false": False}
# A whole Python string literal of each quote kind (escapes skipped; one-line kinds stop at a newline).
_STRINGS = {
    "'": re.compile(r"'[^'\\\n]*(?:\\.[^'\\\n]*)*'", re.DOTALL),
    '"': re.compile(r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"', re.DOTALL),
    "'''": re.compile(r"'''[^'\\]*(?:(?:\\.|'(?!''))[^'\\]*)*'''", re.DOTALL),
    '"""': re.compile(r'"""[^"\\]*(?:(?:\\.|"(?!""))[^"\\]*)*"""', re.DOTALL),
}
_MAX_DEPTH = 64


def _literal(node: ast.expr, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError("too deep")
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and isinstance(node.operand.value, (int, float)) and not isinstance(node.operand.value, bool):
        return -node.operand.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, depth + 1) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {str(_literal(k, depth + 1)): _literal(v, depth + 1) for k, v in zip(node.keys, node.values)}
    raise ValueError(f"not a literal: {type(node).__name__}")


def _call(source: str) -> ScannedCall:
    """One ``name(k=v, ...)`` call, complete, or an error."""
    try:
        tree = ast.parse(source.strip(), mode="eval").body
        if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Name) or tree.args:
            raise ValueError("not a call with keyword arguments")
        args = {}
        for kw in tree.keywords:
            if kw.arg is None:
                raise ValueError("**kwargs")
            args[kw.arg] = _literal(kw.value)
        return ScannedCall(name=tree.func.id, arguments=canonical_json(args), complete=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return ScannedCall(error=True)


def _segments(text: str, start: int) -> tuple[list[tuple[int, int]], int, bool]:
    """Top-level items of the list opened at ``text[start]``: ([(begin, end)] of each finished
    item, index past the closing ``]`` or -1, error). Strings are skipped, brackets counted."""
    items: list[tuple[int, int]] = []
    depth = 0
    begin = start + 1
    i = start + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c in "'\"":
            quote = c * 3 if text.startswith(c * 3, i) else c
            m = _STRINGS[quote].match(text, i)
            if m is None:
                return items, -1, False  # the string is not finished yet
            i = m.end()
            continue
        if c in "([{":
            depth += 1
            if depth > _MAX_DEPTH:
                return items, -1, True
        elif c in ")]}":
            if depth == 0:
                if c != "]":
                    return items, -1, True
                if text[begin:i].strip():
                    items.append((begin, i))
                return items, i + 1, False
            depth -= 1
        elif c == "," and depth == 0:
            items.append((begin, i))
            begin = i + 1
        i += 1
    return items, -1, False


class PythonicToolParser(ScanningToolParser):
    def scan(self, text: str, final: bool) -> Scan:
        rest = text.lstrip()
        if not rest.startswith("["):
            return Scan(content="" if not final and not rest else text)
        out = Scan(content="")
        start = len(text) - len(rest)
        items, end, error = _segments(text, start)
        for b, e in items:
            call = _call(text[b:e])
            out.calls.append(call)
            if call.error:
                return out
        if error or (end >= 0 and text[end:].strip()) or (final and (end < 0 or not items)):
            out.calls.append(ScannedCall(error=True))
        return out
