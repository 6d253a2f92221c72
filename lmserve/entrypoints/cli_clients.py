"""``lmserve complete`` and ``lmserve chat``: small clients of a running server (as
``vllm complete`` / ``vllm chat``), built on the official ``openai`` client.

Interactive by default (one prompt per line, streamed answers, Ctrl-D to quit);
``-q/--quick TEXT`` sends one request and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO


def add_client_args(parser: argparse.ArgumentParser, chat: bool) -> argparse.ArgumentParser:
    parser.add_argument("--url", default="http://localhost:8000/v1", help="The server's base URL (with /v1).")
    parser.add_argument("--model-name", default=None, help="Default: the first model the server lists.")
    parser.add_argument("--api-key", default=None, help="Default: $OPENAI_API_KEY, $VLLM_API_KEY or "
                        "$LMSERVE_API_KEY.")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("-q", "--quick", default=None, metavar="TEXT", help="Send one request and exit.")
    if chat:
        parser.add_argument("--system-prompt", default=None)
    return parser


def _client(args: argparse.Namespace) -> tuple[Any, str]:
    from openai import OpenAI

    key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("VLLM_API_KEY") \
        or os.environ.get("LMSERVE_API_KEY") or "EMPTY"
    client = OpenAI(base_url=args.url, api_key=key)
    model = args.model_name or client.models.list().data[0].id
    return client, model


def _lines(stdin: TextIO, prompt: str) -> Any:
    while True:
        if stdin.isatty():
            print(prompt, end="", flush=True)
        line = stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def run_complete(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    client, model = _client(args)
    kwargs = {"max_tokens": args.max_tokens} if args.max_tokens else {}
    if args.quick is not None:
        out.write(client.completions.create(model=model, prompt=args.quick, **kwargs).choices[0].text + "\n")
        return 0
    for line in _lines(stdin, "> "):
        for chunk in client.completions.create(model=model, prompt=line, stream=True, **kwargs):
            if chunk.choices:
                out.write(chunk.choices[0].text)
                out.flush()
        out.write("\n")
    return 0


def run_chat(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    client, model = _client(args)
    kwargs = {"max_completion_tokens": args.max_tokens} if args.max_tokens else {}
    messages: list[dict[str, str]] = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    if args.quick is not None:
        messages.append({"role": "user", "content": args.quick})
        reply = client.chat.completions.create(model=model, messages=messages, **kwargs)
        out.write((reply.choices[0].message.content or "") + "\n")
        return 0
    for line in _lines(stdin, "> "):
        messages.append({"role": "user", "content": line})
        parts = []
        for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **kwargs):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                out.write(parts[-1])
                out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(parts)})
    return 0
