"""The ``lmserve`` command: ``serve`` (the OpenAI-compatible server), ``run-batch`` (OpenAI
batch files, as ``vllm run-batch``), ``complete`` and ``chat`` (clients of a running server) and ``bench`` (load generators, loaded lazily
from ``lmserve.benchmarks.<name>``, each exposing ``main(argv) -> int | None``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from lmserve.entrypoints.cli_args import add_server_args, parse_serve_args
from lmserve.entrypoints.cli_clients import add_client_args, run_chat, run_complete


def make_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(top-level parser, the serve sub-parser). ``make_run_batch_parser`` builds run-batch's."""
    from lmserve.entrypoints.openai.app import lmserve_version

    parser = argparse.ArgumentParser(prog="lmserve", description="An LLM inference engine with an "
                                     "OpenAI-compatible server, wire-compatible with `vllm serve`.")
    parser.add_argument("--version", action="version", version=f"lmserve {lmserve_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{serve,run-batch,complete,chat,bench}")
    serve = sub.add_parser("serve", help="Start the OpenAI-compatible server.", conflict_handler="resolve",
                           prog="lmserve serve")
    add_server_args(serve)
    sub.add_parser("run-batch", help="Run an OpenAI batch file (JSONL) and write the results (as `vllm "
                   "run-batch`).", add_help=False)
    add_client_args(sub.add_parser("complete", help="Complete prompts against a running server."), chat=False)
    add_client_args(sub.add_parser("chat", help="Chat with a running server."), chat=True)
    bench = sub.add_parser("bench", help="Benchmarks, e.g. `lmserve bench serve` (as `vllm bench serve`).",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser, serve


def make_run_batch_parser() -> argparse.ArgumentParser:
    """The serve flags (model, engine, the refused vLLM ones) plus -i/-o and the other batch flags."""
    from lmserve.entrypoints.run_batch import add_batch_args

    parser = argparse.ArgumentParser(prog="lmserve run-batch", conflict_handler="resolve",
                                     usage="lmserve run-batch -i INPUT.jsonl -o OUTPUT.jsonl [--model] MODEL ...")
    return add_batch_args(add_server_args(parser))


def _run_bench(argv: list[str]) -> int:
    name, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else ("serve", argv)
    try:
        module = importlib.import_module(f"lmserve.benchmarks.{name}")
    except ImportError as e:
        print(f"lmserve bench {name}: not available ({e})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, serve_parser = make_parser()
    if not argv:
        parser.print_help()
        return 2
    if argv[0] not in ("serve", "run-batch", "complete", "chat", "bench"):
        parser.parse_args(argv)  # --help, --version, or an error naming the unknown command: exits
        return 2
    command, rest = argv[0], argv[1:]
    # The chat and complete clients print only the conversation: no INFO lines (httpx logs each request).
    level = logging.WARNING if command in ("complete", "chat") else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    if command == "bench":
        return _run_bench(rest)
    if command == "run-batch":
        from lmserve.entrypoints.run_batch import main_run_batch
        return main_run_batch(parse_serve_args(rest, make_run_batch_parser()))
    if command == "serve":
        args = parse_serve_args(rest, serve_parser)
        from lmserve.entrypoints.frontend_flags import apply_logging, resolve_logging_config
        try:
            apply_logging(resolve_logging_config(args, dict(os.environ)))
        except ValueError as e:
            print(f"lmserve serve: error: {e}", file=sys.stderr)
            return 2
        from lmserve.entrypoints.openai.api_server import run_server
        try:
            return run_server(args)
        except ValueError as e:  # a bad --middleware or --chat-template, ...
            print(f"lmserve serve: error: {e}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    return run_complete(args) if command == "complete" else run_chat(args)


if __name__ == "__main__":
    sys.exit(main())
