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


def test_clients_print_no_http_log_lines(tiny_server):
    """``lmserve chat -q`` as a user runs it: the answer on stdout, no httpx INFO lines anywhere."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "lmserve.entrypoints.cli", "chat", "--url",
                             tiny_server.url + "/v1", "--api-key", API_KEY, "--max-tokens", "3", "-q", "Hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HTTP Request" not in result.stderr + result.stdout and "INFO" not in result.stderr
