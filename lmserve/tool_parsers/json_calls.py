"""Reading one ``{"name": ..., "arguments": {...}}`` tool call out of partial JSON text, shared
by the JSON-based parsers (hermes, llama3_json, mistral's older format)."""

from __future__ import annotations

from lmserve.tool_parsers.partial_json import Node, parse_partial, render
from lmserve.tool_parsers.scanning import ScannedCall


def call_from_node(root: Node | None, ended: bool, arg_keys: tuple[str, ...]) -> ScannedCall:
    """A ScannedCall from an object node: its ``name`` (once the string is closed) and the first
    of ``arg_keys`` present (canonical text so far). ``ended``: no more text will come."""
    call = ScannedCall()
    if root is None:
        call.error = ended
        return call
    if root.kind != "obj":
        call.error = True
        return call
    name = root.get("name")
    if name is not None and name.kind != "str":
        call.error = True
        return call
    if name is not None and name.closed:
        call.name = name.text
    args = None
    for key in arg_keys:
        args = root.get(key)
        if args is not None:
            break
    if args is not None:
        if args.kind != "obj":
            call.error = True
            return call
        call.arguments = render(args)
    if root.closed:
        call.complete = True
        if call.name is None or args is None or not args.closed:
            call.error = True
    elif ended:
        call.error = True
    return call


def scan_json_call(text: str, start: int, ended: bool, arg_keys: tuple[str, ...]) -> tuple[ScannedCall, int]:
    """Reads one call object from ``text[start:]``; returns it and the index past it (or the
    end of the text)."""
    p = parse_partial(text, start)
    call = call_from_node(p.root, ended or p.error, arg_keys)
    if p.error:
        call.error = True
    return call, (p.end if p.end >= 0 else len(text))
