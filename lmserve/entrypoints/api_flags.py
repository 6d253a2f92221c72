"""Serve flags of the Responses, Anthropic, tokenizer-info and dev-mode routes.

vLLM's own: --enable-tokenizer-info-endpoint, --enable-sleep-mode (here: sleep frees the KV
cache and pauses scheduling, on every device), --anthropic-disabled-thinking-effort.
lmserve's own: --responses-store-max-entries / --responses-store-max-bytes bound the
in-memory store behind ``previous_response_id`` (vLLM's store is unbounded and opt-in).
"""

from __future__ import annotations

import argparse

from lmserve.entrypoints.anthropic.protocol import DISABLED_THINKING_EFFORTS
from lmserve.entrypoints.openai.responses.store import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def add_api_args(g: argparse._ArgumentGroup) -> None:  # noqa: SLF001 - argparse's group type
    g.add_argument("--enable-tokenizer-info-endpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="Enable the /tokenizer_info endpoint. May expose chat templates and other tokenizer "
                        "configuration.")
    g.add_argument("--enable-sleep-mode", action=argparse.BooleanOptionalAction, default=False,
                   help="Enable sleep mode: with VLLM_SERVER_DEV_MODE=1, POST /sleep aborts running requests, "
                        "pauses scheduling and frees the KV cache; POST /wake_up re-creates it.")
    g.add_argument("--anthropic-disabled-thinking-effort", default="auto", choices=DISABLED_THINKING_EFFORTS,
                   help="Anthropic /v1/messages only: the reasoning_effort handed to the chat template for "
                        "requests with thinking {'type': 'disabled'}. auto (default): 'none', or 'low' when the "
                        "template refuses 'none'.")
    g.add_argument("--responses-store-max-entries", type=_non_negative, default=DEFAULT_MAX_ENTRIES,
                   help="The most responses /v1/responses keeps for previous_response_id, GET and cancel "
                        "(least recently used evicted first). 0 turns the store off. Default: %(default)s.")
    g.add_argument("--responses-store-max-bytes", type=_non_negative, default=DEFAULT_MAX_BYTES,
                   help="The most bytes of JSON the response store holds. Default: %(default)s (64 MiB).")
