"""In-process apps over ``ScriptedAsyncLLM``, with the official async clients wired to them
through httpx's ASGI transport (no sockets, no model)."""

from __future__ import annotations

from contextlib import asynccontextmanager

import httpx

from lmserve.entrypoints.cli import make_parser
from lmserve.entrypoints.cli_args import parse_serve_args
from lmserve.entrypoints.openai.app import build_app
from tests.server.scripted_engine import ScriptedAsyncLLM

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}
HERMES_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def scripted_app(tokenizer, script: str, argv=(), **engine_kw):
    _, serve = make_parser()
    args = parse_serve_args(list(argv), serve)
    engine = ScriptedAsyncLLM(tokenizer, script=script, **engine_kw)
    return build_app(args, engine), engine


@asynccontextmanager
async def openai_client(app):
    from openai import AsyncOpenAI

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        yield AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http, max_retries=0)


@asynccontextmanager
async def anthropic_client(app):
    import httpx2  # the anthropic SDK's own httpx fork
    from anthropic import AsyncAnthropic

    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t") as http:
        yield AsyncAnthropic(base_url="http://t", auth_token="x", http_client=http, max_retries=0)
