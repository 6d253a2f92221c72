"""An incremental JSON reader for tool-call arguments that grow one token at a time.

``parse_partial(text, start)`` reads one JSON value from ``text[start:]`` and returns the tree
read so far (open nodes for what is not finished yet), where the value ended and whether it met
an error. ``render(node)`` writes a node in canonical form, the form of
``json.dumps(value, ensure_ascii=False)`` (", " and ": " separators):

Invariant (what streaming relies on): if ``a`` is a prefix of ``b``, ``render`` of the tree read
from ``a`` is a prefix of ``render`` of the tree read from ``b``. Numbers and literals are written
only once finished, strings grow by whole decoded characters (an escape is written once complete),
separators only when the next item starts. For a complete value without duplicate keys,
``render`` equals ``json.dumps(json.loads(text), ensure_ascii=False)``.

The reader is iterative (no recursion), so hostile nesting cannot exhaust the stack.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from json.decoder import scanstring

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_WS = " \t\n\r"
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = ("true", "false", "null")
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)  # up to the closing quote or a final backslash
_UNFINISHED_U = re.compile(r"\\u[0-9a-fA-F]{0,3}$")
_HIGH_SURROGATE_U = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}$")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Node:
    """One JSON value: ``kind`` is obj, arr, str, num or lit. ``text`` holds a string's decoded
    characters, a number's or literal's source. ``items``: arr -> [Node]; obj -> [[key Node,
    colon seen, value Node or None]]."""

    kind: str
    closed: bool = False
    text: str = ""
    items: list = field(default_factory=list)

    def value(self) -> object:
        """The Python value of a closed node (json.loads semantics: the last duplicate key wins)."""
        if self.kind == "str":
            return self.text
        if self.kind in ("num", "lit"):
            return json.loads(self.text)
        if self.kind == "arr":
            return [n.value() for n in self.items]
        return {k.text: v.value() for k, _, v in self.items}

    def get(self, key: str) -> "Node | None":
        """An object's value node for ``key`` (the first occurrence), or None."""
        for k, colon, v in self.items:
            if k.closed and k.text == key and colon:
                return v
        return None


@dataclass
class Partial:
    root: Node | None  # None: no value started yet
    end: int  # index just past the value, -1 while it is open
    error: bool  # the text cannot continue into valid JSON


def _read_string(text: str, i: int, node: Node) -> int:
    """Reads a string body from ``text[i:]`` (just past the opening quote) into ``node``, with
    json's C scanner. Returns the index past the closing quote (node closed), ``len(text)`` when
    the input ends first (the decoded prefix, less an unfinished escape or a high surrogate still
    waiting for its pair), or -1 on an invalid escape or control character."""
    n = len(text)
    j = _STRING_BODY.match(text, i).end()
    try:
        if j < n and text[j] == '"':
            node.text, end = scanstring(text, i)
            node.closed = True
            return end
        body = text[i:j]  # a lone backslash at the very end (j < n) is left out
        for unfinished in (_UNFINISHED_U, _HIGH_SURROGATE_U):
            tail = len(body) - 6  # both patterns are at most 6 characters, at the end
            m = unfinished.search(body, max(tail, 0))
            if m is not None and _odd_backslashes(body, m.start()):
                body = body[:m.start()]
        node.text, _ = scanstring(body + '"', 0)
        return n
    except ValueError:
        return -1


def _odd_backslashes(s: str, at: int) -> bool:
    """Whether the backslash at ``s[at]`` starts an escape (an even number precedes it)."""
    k = at
    while k > 0 and s[k - 1] == "\\":
        k -= 1
    return (at - k) % 2 == 0


def parse_partial(text: str, start: int = 0) -> Partial:
    """Reads one JSON value starting at ``text[start:]`` (leading whitespace skipped)."""
    n = len(text)
    i = start
    root: Node | None = None
    stack: list[Node] = []
    # Per open container: what comes next. obj: key, colon, value, next; arr: first, value, next.
    expect: list[str] = []

    def attach(node: Node) -> None:
        nonlocal root
        if not stack:
            root = node
            return
        top = stack[-1]
        if top.kind == "arr":
            top.items.append(node)
            expect[-1] = "next"
        elif expect[-1] == "key":
            top.items.append([node, False, None])
            expect[-1] = "colon"
        else:
            top.items[-1][2] = node
            expect[-1] = "next"

    while True:
        while i < n and text[i] in _WS:
            i += 1
        if i >= n:
            return Partial(root, -1, False)
        if root is not None and not stack:
            return Partial(root, i, False)  # i: first non-space after the value (caller checks)
        c = text[i]
        want = expect[-1] if expect else "value"
        if want == "colon":
            if c != ":":
                return Partial(root, -1, True)
            stack[-1].items[-1][1] = True
            expect[-1] = "value"
            i += 1
            continue
        if want == "next":
            top = stack[-1]
            if c == ",":
                expect[-1] = "key" if top.kind == "obj" else "value"
                i += 1
                continue
            if c == ("}" if top.kind == "obj" else "]"):
                top.closed = True
                stack.pop()
                expect.pop()
                i += 1
                if not stack:
                    return Partial(root, i, False)
                continue
            return Partial(root, -1, True)
        if want in ("key", "first") and c == ("}" if want == "key" else "]") and stack[-1].closed is False \
                and not stack[-1].items:
            stack[-1].closed = True
            stack.pop()
            expect.pop()
            i += 1
            if not stack:
                return Partial(root, i, False)
            continue
        if want == "key" and c != '"':
            return Partial(root, -1, True)
        if c == '"':
            node = Node("str")
            attach(node)
            i = _read_string(text, i + 1, node)
            if i < 0:
                return Partial(root, -1, True)
            if not node.closed:
                return Partial(root, -1, False)
            if not stack:
                return Partial(root, i, False)
            continue
        if c in "{[":
            node = Node("obj" if c == "{" else "arr")
            attach(node)
            stack.append(node)
            expect.append("key" if c == "{" else "first")
            i += 1
            continue
        if c == "-" or c.isdigit():
            j = i
            while j < n and text[j] in _NUMBER_CHARS:
                j += 1
            if j >= n:  # the number may go on
                attach(Node("num", text=text[i:j]))
                return Partial(root, -1, False)
            if _NUMBER.fullmatch(text, i, j) is None:
                return Partial(root, -1, True)
            attach(Node("num", closed=True, text=text[i:j]))
            i = j
            if not stack:
                return Partial(root, i, False)
            continue
        for word in _LITERALS:
            if text.startswith(word, i):
                attach(Node("lit", closed=True, text=word))
                i += len(word)
                break
            if word.startswith(text[i:]):
                attach(Node("lit", text=text[i:]))
                return Partial(root, -1, False)
        else:
            return Partial(root, -1, True)
        if not stack:
            return Partial(root, i, False)


def finish_number(node: Node) -> bool:
    """Closes an open top-level number at the end of the whole input; False if it is no number."""
    if node.kind == "num" and not node.closed:
        if _NUMBER.fullmatch(node.text) is None:
            return False
        node.closed = True
    return True


def _escape(s: str) -> str:
    out = json.dumps(s, ensure_ascii=False)[1:-1]
    if _SURROGATE.search(out):  # lone surrogates: escaped, never raw
        out = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", out)
    return out


def _number(src: str) -> str:
    v = json.loads(src)
    if isinstance(v, float) and not math.isfinite(v):
        return src
    return json.dumps(v)


def render(node: Node | None) -> str:
    """The canonical text of ``node`` as far as it is known (see the module invariant)."""
    if node is None:
        return ""
    parts: list[str] = []
    # Iterative: a work list of nodes and literal strings.
    work: list[object] = [node]
    while work:
        item = work.pop()
        if isinstance(item, str):
            parts.append(item)
            continue
        assert isinstance(item, Node)
        if item.kind == "str":
            parts.append('"' + _escape(item.text) + ('"' if item.closed else ""))
        elif item.kind == "num":
            if item.closed:
                parts.append(_number(item.text))
        elif item.kind == "lit":
            if item.closed:
                parts.append(item.text)
        elif item.kind == "arr":
            seq: list[object] = ["["]
            for k, sub in enumerate(item.items):
                if k:
                    seq.append(", ")
                seq.append(sub)
            if item.closed:
                seq.append("]")
            work.extend(reversed(seq))
        else:
            seq = ["{"]
            for k, (key, colon, val) in enumerate(item.items):
                if k:
                    seq.append(", ")
                seq.append(key)
                if colon:
                    seq.append(": ")
                    if val is not None:
                        seq.append(val)
            if item.closed:
                seq.append("}")
            work.extend(reversed(seq))
    return "".join(parts)


def is_closed(node: Node | None) -> bool:
    return node is not None and node.closed


def canonical_json(value: object) -> str:
    """The canonical argument text of a Python value (what ``render`` writes for it)."""
    return json.dumps(value, ensure_ascii=False)
