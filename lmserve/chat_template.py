"""Chat templates: load, pick, detect the content format, normalise messages and render, as vLLM.

Invariants:
- Rendering runs in jinja2's ``ImmutableSandboxedEnvironment`` with the globals and filters that
  transformers gives chat templates (``raise_exception``, ``strftime_now``, a non-escaping
  ``tojson``, ``{% generation %}`` blocks, loop controls), ``trim_blocks`` and ``lstrip_blocks``;
  for the same template and inputs the text equals transformers' ``apply_chat_template(tokenize=False)``.
- Messages given by callers are never mutated; the template sees plain dicts/lists/str/numbers.
- Every user-facing problem (no template, image content, both ``add_generation_prompt`` and
  ``continue_final_message``, a template that raises) is a ``ValueError`` (a 400 in the server).
- Compiled templates and detected formats are memoised per template text (pure functions).
- Bounded: a template longer than ``TemplateLimits.max_template_chars`` is refused before it is
  parsed; nothing is evaluated at compile time (jinja's constant folding is off, so
  ``[0] * 10**9`` is not built while compiling); ``*``, ``**`` and ``+`` refuse results larger
  than ``max_output_chars`` items (or integers wider than ``_MAX_INT_BITS``); ``range`` is capped
  by the sandbox; rendering stops once the output passes ``max_output_chars``. Render time and
  memory are bounded only by the caller: the server renders request templates in a separate,
  killable process (``lmserve.entrypoints.chat_template_sandbox``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterator, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

ContentFormat = Literal["string", "openai"]
_CONTENT_FORMATS = ("auto", "string", "openai")
_TEXT_PART_TYPES = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
_MEDIA_PART_TYPES = {"image_url", "image", "input_image", "image_embeds", "image_pil", "audio_url", "audio",
                     "input_audio", "video_url", "video", "file", "input_file"}
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Keys of chat_template_kwargs that would change what is rendered rather than feed the template.
_RESERVED_KWARGS = {"messages", "conversation", "chat_template", "tokenize"}
_MAX_INT_BITS = 4096  # integers a template may build with * and ** (pow of big ints is slow)


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on one chat-template render. Exceeding one is a ``TemplateLimitError`` (a 400).

    ``max_template_chars`` and ``max_output_chars`` are enforced here, in any process;
    ``render_timeout_s`` (compile + render) and ``memory_bytes`` (the address space of the
    rendering process) only by the sandbox process pool."""

    max_template_chars: int = 128 * 1024
    max_output_chars: int = 4 * 1024 * 1024
    render_timeout_s: float = 5.0
    memory_bytes: int = 1 << 30


DEFAULT_LIMITS = TemplateLimits()


class TemplateLimitError(ValueError):
    """A chat template went past one of its ``TemplateLimits``."""


# ----------------------------------------------------------------------------- loading / picking
def load_chat_template(value: str | os.PathLike[str] | None) -> str | None:
    """``--chat-template``: a path to a template file, or the template itself (as vLLM: a value
    that is not a readable file and contains ``{``, ``}`` or a newline is the template, with its
    backslash escapes such as ``\\n`` decoded). A value that looks like a path but cannot be read
    is a ``ValueError``."""
    if value is None:
        return None
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        if isinstance(value, os.PathLike):
            raise
        if not any(c in value for c in "{}\n"):
            raise ValueError(f"The supplied chat template ({value}) looks like a file path, "
                             f"but it failed to be opened. Reason: {e}") from e
    # Decode escapes while keeping non-Latin-1 characters intact.
    return value.encode("latin-1", "backslashreplace").decode("unicode_escape")


def resolve_chat_template(tokenizer: Any, chat_template: str | None = None,
                          tools: list[dict[str, Any]] | None = None) -> str:
    """The template text to render: ``chat_template`` when given (or the name of one of the
    tokenizer's named templates), else the tokenizer's (its "tool_use" template when tools are
    given and it has one, else "default"). Raises ``ValueError`` when there is none."""
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(own, list):  # tokenizer_config.json form: [{"name": ..., "template": ...}]
        own = {t["name"]: t["template"] for t in own}
    if chat_template is not None:
        if isinstance(own, dict) and chat_template in own:
            return own[chat_template]
        return chat_template
    if isinstance(own, dict):
        if tools and "tool_use" in own:
            return own["tool_use"]
        if "default" in own:
            return own["default"]
        own = None
    if not own:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(f"The tokenizer of {name!r} does not define a chat template; pass --chat-template "
                         "(a file path or the template itself) or the request's chat_template field.")
    return own


# ----------------------------------------------------------------------------- jinja environment
class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with ``*``, ``**``, ``+``, ``%``, calls and filters checked before they run (see the
    module contract)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, max_items: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_items = max_items
        for name, fn in list(self.filters.items()):  # e.g. center(10**9), format("%0999999999d")
            self.filters[name] = _sized_args(fn, max_items)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right, self.max_items)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_sizes(args, kwargs, __self.max_items)  # e.g. "x".ljust(10**9)
        return super().call(__context, __obj, *args, **kwargs)


_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\d+)?(?:\.(\d+))?")


def _check_sizes(args: tuple, kwargs: dict[str, Any], max_items: int) -> None:
    """Refuses an integer argument (a width, a count) or a %-format width above ``max_items``."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > max_items:
            raise SecurityError(f"the template passes {a} as an argument (the limit is {max_items})")
        if isinstance(a, str) and "%" in a:
            _check_format(a, max_items)


def _check_format(fmt: str, max_items: int) -> None:
    for m in _FORMAT_WIDTH.finditer(fmt):
        for width in m.groups():
            if width is not None and int(width) > max_items:
                raise SecurityError(f"the template formats with a width of {width} (the limit is {max_items})")


def _sized_args(fn: Any, max_items: int) -> Any:
    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check_sizes(args, kwargs, max_items)
        return fn(*args, **kwargs)

    return checked


def _check_binop(operator: str, left: Any, right: Any, max_items: int) -> None:
    sized = (str, list, tuple)
    is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, sized) and is_int(n) and len(seq) * max(n, 0) > max_items:
                raise SecurityError(f"the template builds a sequence of {len(seq) * n} items "
                                    f"(the limit is {max_items})")
        if is_int(left) and is_int(right) and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise SecurityError("the template multiplies integers that are too large")
    elif operator == "**":
        if is_int(left) and is_int(right) and right > 0 and max(left.bit_length(), 1) * right > _MAX_INT_BITS:
            raise SecurityError("the template raises an integer to too large a power")
    elif operator == "%" and isinstance(left, str):
        _check_format(left, max_items)
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        if len(left) + len(right) > max_items:
            raise SecurityError(f"the template builds a sequence of {len(left) + len(right)} items "
                                f"(the limit is {max_items})")


@lru_cache(maxsize=4)
def _environment(max_items: int = DEFAULT_LIMITS.max_output_chars) -> _BoundedEnvironment:
    # optimized=False: no constant folding, so nothing a template says runs at compile time.
    env = _BoundedEnvironment(max_items, trim_blocks=True, lstrip_blocks=True, optimized=False,
                              extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _sized_args(_tojson, max_items)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def check_template_size(chat_template: str, limits: TemplateLimits = DEFAULT_LIMITS) -> None:
    if len(chat_template) > limits.max_template_chars:
        raise TemplateLimitError(f"The chat template is {len(chat_template)} characters long; the limit is "
                                 f"{limits.max_template_chars}.")


@lru_cache(maxsize=32)
def _compile(chat_template: str, max_items: int = DEFAULT_LIMITS.max_output_chars) -> jinja2.Template:
    try:
        return _environment(max_items).from_string(chat_template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"The chat template is not valid Jinja: {e}") from e


def _render_bounded(template: jinja2.Template, max_chars: int, variables: dict[str, Any]) -> str:
    """Renders chunk by chunk, stopping as soon as the output passes ``max_chars``."""
    parts: list[str] = []
    size = 0
    for chunk in template.generate(**variables):
        size += len(chunk)
        if size > max_chars:
            raise TemplateLimitError(f"The chat template's output passed the limit of {max_chars} characters.")
        parts.append(chunk)
    return "".join(parts)


# ----------------------------------------------------------------------------- content format
def _is_var(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _is_attr(node: jinja2.nodes.Node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return _is_var(node.node, name) and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False


def _is_var_or_elems(node: jinja2.nodes.Node, name: str, key: str | None = None) -> bool:
    """``name`` (or ``name[key]``/``name.key``), possibly filtered, tested or sliced."""
    if isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)):
        return node.node is not None and _is_var_or_elems(node.node, name, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _is_var_or_elems(node.node, name, key)
    return _is_attr(node, name, key) if key else _is_var(node, name)


def _aliases(root: jinja2.nodes.Template, name: str) -> list[str]:
    """``name`` and every variable assigned from it (``{% set loop_messages = messages[1:] %}``)."""
    found, queue = [name], deque([name])
    while queue:
        cur = queue.popleft()
        for assign in root.find_all(jinja2.nodes.Assign):
            if isinstance(assign.target, jinja2.nodes.Name) and _is_var_or_elems(assign.node, cur):
                if assign.target.name not in found:
                    found.append(assign.target.name)
                    queue.append(assign.target.name)
    return found


def _loop_vars(root: jinja2.nodes.Template, over: list[str], key: str | None) -> Iterator[str]:
    """Targets of ``{% for x in v %}`` (``key`` None) or ``{% for x in v[key] %}`` for v in ``over``."""
    for loop in root.find_all(jinja2.nodes.For):
        if isinstance(loop.target, jinja2.nodes.Name) and any(_is_var_or_elems(loop.iter, v, key) for v in over):
            yield loop.target.name


def _indexes_content_type(root: jinja2.nodes.Template, message_vars: list[str]) -> bool:
    """``message['content'][i]['type']`` / ``message.content[0].type`` anywhere in the template."""
    for node in root.find_all((jinja2.nodes.Getitem, jinja2.nodes.Getattr)):
        is_type = (node.attr == "type" if isinstance(node, jinja2.nodes.Getattr)
                   else isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "type")
        inner = node.node
        if is_type and isinstance(inner, jinja2.nodes.Getitem) and not isinstance(inner.arg, jinja2.nodes.Slice):
            if any(_is_attr(inner.node, m, "content") for m in message_vars):
                return True
    return False


@lru_cache(maxsize=32)
def detect_content_format(chat_template: str) -> ContentFormat:
    """"openai" when the template loops over a message's ``content`` (or indexes its parts'
    ``type``), i.e. expects a list of parts; else "string" (as vLLM's ``_detect_content_format``)."""
    try:
        root = _environment().parse(chat_template)  # parsed only: nothing is evaluated
    except Exception:  # an unparsable template fails later, with a clear error, when rendered
        return "string"
    message_vars = list(_loop_vars(root, _aliases(root, "messages"), None))
    if next(_loop_vars(root, message_vars, "content"), None) is not None:
        return "openai"
    return "openai" if _indexes_content_type(root, message_vars) else "string"


def resolve_content_format(chat_template: str, content_format: str = "auto") -> ContentFormat:
    if content_format not in _CONTENT_FORMATS:
        raise ValueError(f"chat template content format must be one of {_CONTENT_FORMATS}, got {content_format!r}")
    if content_format == "auto":
        return detect_content_format(chat_template)
    return content_format  # type: ignore[return-value]


# ----------------------------------------------------------------------------- messages
def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise ValueError(f"A content part must be an object, got {type(part).__name__}")
    ptype = part.get("type")
    if ptype is None:  # untyped part: infer from its keys, as vLLM
        ptype = "text" if "text" in part else next((k for k in part if k in _MEDIA_PART_TYPES), None)
    if ptype in _MEDIA_PART_TYPES:
        raise ValueError(f"Content part type {ptype!r} is not supported by this model (it accepts text only).")
    if ptype not in _TEXT_PART_TYPES:
        raise ValueError(f"Unknown content part type: {ptype!r}")
    text = part.get(_TEXT_PART_TYPES[ptype])
    if not isinstance(text, str):
        raise ValueError(f"Content part of type {ptype!r} needs a string {_TEXT_PART_TYPES[ptype]!r} field")
    return text


def _parse_tool_calls(tool_calls: list[Any]) -> list[dict[str, Any]]:
    """Assistant tool calls with JSON-string arguments turned into objects (what templates expect)."""
    out = []
    for call in tool_calls:
        call = copy.deepcopy(call)
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            args = fn.get("arguments")
            if not args:
                fn["arguments"] = {}
            elif isinstance(args, str):
                try:
                    fn["arguments"] = json.loads(args)
                except json.JSONDecodeError as e:
                    raise ValueError(f"tool call arguments are not valid JSON: {args!r}") from e
        out.append(call)
    return out


def parse_chat_messages(messages: list[Any], content_format: ContentFormat) -> list[dict[str, Any]]:
    """OpenAI chat messages -> what the template sees (new dicts; the input is not modified).

    Content becomes a string (text parts joined with "\\n") for "string" templates, or a list of
    ``{"type": "text", "text": ...}`` for "openai" ones; None content is "" / []. Kept fields:
    role, content, name; assistant ``tool_calls`` (arguments parsed to objects) and reasoning
    (as both ``reasoning`` and ``reasoning_content``); tool ``tool_call_id``.
    """
    out: list[dict[str, Any]] = []
    for msg in messages:
        if hasattr(msg, "model_dump"):
            msg = msg.model_dump(exclude_none=True)
        if not isinstance(msg, dict) or "role" not in msg:
            raise ValueError(f"Each chat message must be an object with a 'role', got {msg!r}")
        role, content = msg["role"], msg.get("content")
        parts = [] if content is None else [content] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ValueError(f"Message content must be a string or a list of parts, got {type(content).__name__}")
        texts = [_part_text(p) for p in parts]
        new: dict[str, Any] = {"role": role}
        if content_format == "openai":
            new["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            new["content"] = "\n".join(texts)
        if role == "assistant":
            if msg.get("tool_calls") is not None:
                new["tool_calls"] = _parse_tool_calls(list(msg["tool_calls"]))
            reasoning = msg.get("reasoning") if msg.get("reasoning") is not None else msg.get("reasoning_content")
            if reasoning is not None:
                new["reasoning"] = new["reasoning_content"] = reasoning
        elif role == "tool" and "tool_call_id" in msg:
            new["tool_call_id"] = msg["tool_call_id"]
        if isinstance(msg.get("name"), str):
            new["name"] = msg["name"]
        out.append(new)
    return out


# ----------------------------------------------------------------------------- rendering
def special_tokens_of(tokenizer: Any) -> dict[str, str]:
    """bos_token, eos_token, ... as strings (transformers passes these to every template)."""
    stm = getattr(tokenizer, "special_tokens_map", None) if tokenizer is not None else None
    return {k: str(v) for k, v in (stm or {}).items() if isinstance(v, str) or hasattr(v, "content")}


def _mark_final_message(messages: list[dict[str, Any]]) -> str:
    """Appends the continuation tag to the last message's (last text part of its) content; returns
    the original text so the render can be checked."""
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty.")
    content = messages[-1].get("content")
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                original = part["text"]
                part["text"] = original + _CONTINUE_TAG
                return original
        raise ValueError("continue_final_message is set but the final message has no text to continue.")
    if not isinstance(content, str):
        raise ValueError("continue_final_message is set but the final message has no content to continue.")
    messages[-1]["content"] = content + _CONTINUE_TAG
    return content


def _cut_at_final_message(rendered: str, original: str) -> str:
    """Everything the template rendered after the final message's text is dropped (as transformers)."""
    tag = _CONTINUE_TAG.strip()
    if tag not in rendered or original.strip() not in rendered:
        raise ValueError("continue_final_message is set but the final message does not appear in the rendered "
                         "chat; the chat template drops or rewrites part of it.")
    loc = rendered.rindex(tag)
    if rendered[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:loc]
    return rendered[:loc].rstrip()  # the template trimmed the message's trailing whitespace


def apply_chat_template(
    tokenizer: Any,
    messages: list[Any],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    content_format: str = "auto",
    limits: TemplateLimits = DEFAULT_LIMITS,
) -> str:
    """Renders a conversation to the prompt text (not tokenized; the template adds any BOS).

    ``chat_template``: template text (or a named template of the tokenizer); default the
    tokenizer's. ``chat_template_kwargs`` are extra template variables and, as in vLLM, may also
    set add_generation_prompt / continue_final_message / tools / documents.
    ``content_format``: "auto" (detected from the template), "string" or "openai".
    ``limits``: the template's size and output bounds (``TemplateLimitError``, a ValueError).
    Raises ``ValueError`` for a missing template, non-text content, both add_generation_prompt
    and continue_final_message, or a template error.
    """
    kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt,
                              "continue_final_message": continue_final_message,
                              "tools": tools, "documents": documents}
    for key, value in (chat_template_kwargs or {}).items():
        if key not in _RESERVED_KWARGS:
            kwargs[key] = value
    add_generation_prompt = bool(kwargs.pop("add_generation_prompt"))
    continue_final_message = bool(kwargs.pop("continue_final_message"))
    if add_generation_prompt and continue_final_message:
        raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    tools, documents = kwargs.pop("tools"), kwargs.pop("documents")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("tools must be a list of JSON objects")
    if documents is not None and not (isinstance(documents, list) and all(isinstance(d, dict) for d in documents)):
        raise ValueError("documents must be a list of objects (with 'title' and 'text' keys)")

    template = resolve_chat_template(tokenizer, chat_template, tools)
    check_template_size(template, limits)
    fmt = resolve_content_format(template, content_format)
    chat = parse_chat_messages(messages, fmt)
    original = _mark_final_message(chat) if continue_final_message else None
    variables = {**special_tokens_of(tokenizer), **copy.deepcopy(kwargs)}
    try:
        variables.update(messages=chat, tools=copy.deepcopy(tools), documents=copy.deepcopy(documents),
                         add_generation_prompt=add_generation_prompt)
        rendered = _render_bounded(_compile(template, limits.max_output_chars), limits.max_output_chars, variables)
    except TemplateLimitError:
        raise
    except MemoryError as e:
        raise TemplateLimitError("The chat template needs more memory than it may use.") from e
    except Exception as e:  # raise_exception(), undefined names, type errors in the template...
        raise ValueError(f"Chat template error: {type(e).__name__}: {e}") from e
    return _cut_at_final_message(rendered, original) if original is not None else rendered
