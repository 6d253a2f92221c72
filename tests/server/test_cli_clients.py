"""``lmserve complete`` and ``lmserve chat`` against the running tiny server."""

from __future__ import annotations

import io

from lmserve.entrypoints.cli import make_parser
from lmserve.entrypoints.cli_clients import run_chat, run_complete
from tests.server.conftest import API_KEY


def _args(tiny_server, command, *extra):
    parser, _ = make_parser()
    return parser.parse_args([command, "--url", tiny_server.url + "/v1", "--api-key", API_KEY,
                              "--max-tokens", "3", *extra])


def test_complete_quick_and_interactive(tiny_server):
    out = io.StringIO()
    assert run_complete(_args(tiny_server, "complete", "-q", "Hello"), out=out) == 0
    assert out.getvalue().count("\n") >= 1  # sampled text (temperature 1) then a newline
    out = io.StringIO()
    assert run_complete(_args(tiny_server, "complete"), stdin=io.StringIO("Hello\nParis\n"), out=out) == 0
    assert out.getvalue().count("\n") >= 2  # one answer per line typed (answers are sampled)


def test_chat_quick_and_interactive(tiny_server):
    out = io.StringIO()
    assert run_chat(_args(tiny_server, "chat", "--system-prompt", "Be brief.", "-q", "Hi"), out=out) == 0
    assert out.getvalue().endswith("\n")
    out = io.StringIO()
    assert run_chat(_args(tiny_server, "chat", "--model-name", "tiny-alias"), stdin=io.StringIO("Hi\nAgain\n"),
                    out=out) == 0
    assert out.getvalue().count("\n") >= 2  # one answer per line typed (answers are sampled)
