"""The ``lmserve serve`` flags (named and defaulted as ``vllm serve``'s, seed 002) and
``--config file.yaml``.

Precedence: command line > config file > defaults. Config keys are the long flag names
without the leading dashes (``uvicorn-log-level`` or ``uvicorn_log_level``).

Flags of ``vllm serve`` that cannot apply to this engine (LoRA, speculative decoding,
other quantization methods, tool/reasoning parsers, ...) are accepted by the parser so
that a vLLM command line parses, then refused with a message naming the flag, unless
they hold a value that asks for what lmserve does anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from typing import Any

import yaml

from lmserve.engine.arg_utils import EngineArgs
from lmserve.entrypoints.openai.limits import (DEFAULT_H11_MAX_INCOMPLETE_EVENT_SIZE, DEFAULT_MAX_BODY_BYTES,
                                               DEFAULT_MAX_HEADER_COUNT)
from lmserve.entrypoints.openai.serving_engine import DEFAULT_MAX_LOG_LEN, DEFAULT_MAX_STOP_STRINGS
from lmserve.entrypoints.api_flags import add_api_args
from lmserve.entrypoints.openai.serving_lora import parse_lora_module
from lmserve.entrypoints.frontend_flags import add_frontend_args
from lmserve.entrypoints.help_groups import filtered_help, help_keyword, regroup_as_vllm
from lmserve.entrypoints.tool_reasoning_flags import add_tool_reasoning_args, check_tool_reasoning_args
from lmserve.entrypoints.vllm_flags import check_foreign_flags, register_foreign_flags


def _json_list(value: str) -> list[str]:
    """'["a","b"]' (vLLM's form) or 'a,b' -> list."""
    value = value.strip()
    if value.startswith("["):
        out = json.loads(value)
        if not isinstance(out, list):
            raise argparse.ArgumentTypeError("expected a JSON list")
        return [str(x) for x in out]
    return [v.strip() for v in value.split(",") if v.strip()]


def _true(_: Any) -> bool:
    return True


# flag -> (argparse kwargs, accepted(value), why it cannot apply). Default None means "not given".
_UNSUPPORTED: dict[str, tuple[dict[str, Any], Callable[[Any], bool], str]] = {}


def _unsupported(flag: str, why: str, accepted: Callable[[Any], bool] = lambda v: False, **kwargs: Any) -> None:
    _UNSUPPORTED[flag] = (kwargs, accepted, why)


_SPEC = "speculative decoding is not supported by lmserve"
_MM = "lmserve serves text-only models"
_unsupported("--enable-lora-bias", "LoRA adapters with biases are not supported", action="store_const", const=True)
_unsupported("--enable-prompt-adapter", "prompt adapters are not supported", action="store_const", const=True)
_unsupported("--prompt-adapters", "prompt adapters are not supported", nargs="+")
_unsupported("--lora-extra-vocab-size", "LoRA adapters cannot extend the vocabulary")
_unsupported("--long-lora-scaling-factors", "long-context LoRA scaling is not supported")
_unsupported("--qlora-adapter-name-or-path", "QLoRA adapters are not supported: serve a PEFT LoRA adapter with "
             "--enable-lora --lora-modules")
for _f in ("--max-prompt-adapters", "--max-prompt-adapter-token"):
    _unsupported(_f, "prompt adapters are not supported")
for _f in ("--speculative-model", "--speculative-model-quantization", "--num-speculative-tokens",
           "--speculative-draft-tensor-parallel-size", "--speculative-max-model-len",
           "--speculative-disable-by-batch-size", "--ngram-prompt-lookup-max", "--ngram-prompt-lookup-min",
           "--spec-decoding-acceptance-method", "--typical-acceptance-sampler-posterior-threshold",
           "--typical-acceptance-sampler-posterior-alpha", "--disable-logprobs-during-spec-decoding",
           "--speculative-config"):
    _unsupported(_f, _SPEC)
_unsupported("--speculative-disable-mqa-scorer", _SPEC, action="store_const", const=True)
for _f in ("--limit-mm-per-prompt", "--mm-processor-kwargs", "--allowed-local-media-path"):
    _unsupported(_f, _MM)
_unsupported("--disable-mm-preprocessor-cache", _MM, action="store_const", const=True)
_unsupported("--enable-reasoning", "removed in vLLM too: --reasoning-parser alone turns reasoning parsing on",
             action="store_const", const=True)
_unsupported("--config-format", "only Hugging Face configs are read", accepted=lambda v: v in ("auto", "hf"))
_unsupported("--guided-decoding-backend", "removed in vLLM; use --structured-outputs-config.backend (lmserve runs "
             "xgrammar)", accepted=lambda v: v in ("auto", "xgrammar"))
_unsupported("--kv-transfer-config", "this build has no KV connector (no disaggregated prefill/decode or KV "
             "offload to another instance); requests may still carry kv_transfer_params, which are answered with "
             "null and run the whole request locally")
_unsupported("--worker-cls", "custom worker classes are not supported", accepted=lambda v: v == "auto")
_unsupported("--calculate-kv-scales", "fp8 KV caches are not supported", action="store_const", const=True)
_unsupported("--cpu-offload-gb", "weight offloading is not supported", accepted=lambda v: float(v) == 0)
_unsupported("--preemption-mode", "preemption recomputes; KV blocks are never swapped",
             accepted=lambda v: v == "recompute")
_unsupported("--num-scheduler-steps", "multi-step scheduling is not supported", accepted=lambda v: int(v) == 1)
_unsupported("--multi-step-stream-outputs", "multi-step scheduling is not supported", nargs="?", const="True")
_unsupported("--scheduler-delay-factor", "scheduler delays are not supported", accepted=lambda v: float(v) == 0)
_unsupported("--num-lookahead-slots", "lookahead slots are for speculative decoding",
             accepted=lambda v: int(v) == 0)
_unsupported("--max-seq-len-to-capture", "CUDA graph capture sizes are not configurable")
_unsupported("--tokenizer-pool-size", "tokenization runs in the server process", accepted=lambda v: int(v) == 0)
_unsupported("--tokenizer-pool-type", "tokenization runs in the server process")
_unsupported("--tokenizer-pool-extra-config", "tokenization runs in the server process")
_unsupported("--override-neuron-config", "Neuron devices are not supported")
_unsupported("--otlp-traces-endpoint", "OpenTelemetry tracing is not supported")
_unsupported("--collect-detailed-traces", "OpenTelemetry tracing is not supported")
_unsupported("--code-revision", "remote model code is never run")
_unsupported("--max-parallel-loading-workers", "weights load in one pass")
_unsupported("--ray-workers-use-nsight", "Ray is not used", action="store_const", const=True)
_unsupported("--ignore-patterns", "weight file filtering is not supported")
_unsupported("--model-loader-extra-config", "the model loader takes no extra config")
_unsupported("--api-server-count", "one API server process serves every request; run more servers behind a "
             "load balancer", accepted=lambda v: int(v) == 1)
_unsupported("--disable-sliding-window", "sliding-window attention is not configurable",
             action="store_const", const=True)


# vLLM flags that ask for nothing this engine does differently: (flag, argparse kwargs, why). Given on
# the command line or in the config file, each is accepted and named once in the start-up log
# (``finalize_serve_args`` puts the lines in ``args.noop_flags``).
NOOP_FLAGS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("--use-v2-block-manager", dict(action="store_const", const=True), "there is one block manager"),
    ("--swap-space", dict(type=float), "preemption recomputes (as vLLM's V1 engine); no KV block is swapped "
     "to CPU memory, so no swap space is reserved"),
    ("--disable-custom-all-reduce", dict(action="store_const", const=True), "there is no custom all-reduce"),
    ("--disable-async-output-proc", dict(action="store_const", const=True), "outputs are processed synchronously"),
    ("--async-scheduling", dict(action=argparse.BooleanOptionalAction),
     "the engine thread schedules each step after the previous one"),
    ("--disable-frontend-multiprocessing", dict(action="store_const", const=True),
     "the API server and the engine share one process"),
    ("--enable-server-load-tracking", dict(action="store_const", const=True), "GET /load always reports the load"),
    ("--compilation-config", {}, "the model runs eagerly; nothing is compiled or captured (no torch.compile, "
     "no CUDA graphs)"),
    ("-O", {}, "the model runs eagerly; nothing is compiled or captured (no torch.compile, no CUDA graphs)"),
)


def make_serve_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """A parser whose later definitions win (so EngineArgs' flags override ours)."""
    return argparse.ArgumentParser(conflict_handler="resolve", **kwargs)


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Registers the serve flags (server, engine, and the refused vLLM ones) on ``parser``."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="The model: a local directory, a .gguf file or a Hugging Face id in the local "
                             "cache. Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--config", default=None, help="A YAML file of flags (keys are the long flag names "
                        "without dashes). Precedence: command line > config file > defaults.")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=None, help="Host name (default: all interfaces).")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["debug", "info", "warning", "error", "critical", "trace"])
    g.add_argument("--allow-credentials", action="store_true")
    g.add_argument("--allowed-origins", type=_json_list, default=["*"])
    g.add_argument("--allowed-methods", type=_json_list, default=["*"])
    g.add_argument("--allowed-headers", type=_json_list, default=["*"])
    g.add_argument("--api-key", default=None, help="Require this key (Authorization: Bearer KEY) on every "
                   "route except /health, /ping and /metrics. Default: $VLLM_API_KEY or $LMSERVE_API_KEY.")
    g.add_argument("--chat-template", default=None, help="A chat template file, or the template itself.")
    g.add_argument("--chat-template-content-format", default="auto", choices=["auto", "string", "openai"])
    g.add_argument("--response-role", default="assistant")
    g.add_argument("--ssl-keyfile", default=None)
    g.add_argument("--ssl-certfile", default=None)
    g.add_argument("--ssl-ca-certs", default=None)
    g.add_argument("--ssl-cert-reqs", type=int, default=0)
    g.add_argument("--root-path", default=None)
    g.add_argument("--middleware", action="append", default=[],
                   help="An ASGI middleware class or an async http middleware function (import path).")
    g.add_argument("--return-tokens-as-token-ids", action="store_true")
    g.add_argument("--enable-request-id-headers", action="store_true")
    g.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False,
                   help="Log each request (its params at INFO, its prompt at DEBUG), as vLLM. Default: off.")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="Deprecated in vLLM (requests are not logged unless --enable-log-requests); wins over it.")
    g.add_argument("--max-log-len", type=int, default=DEFAULT_MAX_LOG_LEN,
                   help="The most characters of a prompt, its token ids or its params that a log line shows. "
                        "Default: %(default)s.")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="Accept a request's chat_template (otherwise a 400, as vLLM). Trusted request "
                        "templates still render in separate processes with time and memory limits.")
    g.add_argument("--shutdown-timeout", type=float, default=0,
                   help="On SIGTERM/SIGINT, wait at most this many seconds for running requests to finish, "
                        "then end the rest with an error event. 0 (default, as vLLM): end them at once. "
                        "A second signal exits at once.")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="Requests with a larger body get a 413. Default: %(default)s (16 MiB).")
    g.add_argument("--max-stop-strings", type=int, default=DEFAULT_MAX_STOP_STRINGS,
                   help="The most entries a request's stop (or bad_words) list may hold. Default: %(default)s.")
    g.add_argument("--h11-max-incomplete-event-size", type=int, default=DEFAULT_H11_MAX_INCOMPLETE_EVENT_SIZE,
                   help="The most bytes of a request line plus headers (uvicorn's h11 parser). "
                        "Default: %(default)s.")
    g.add_argument("--h11-max-header-count", type=int, default=DEFAULT_MAX_HEADER_COUNT,
                   help="Requests with more headers get a 431. Default: %(default)s.")
    g.add_argument("--disable-fastapi-docs", action="store_true")
    g.add_argument("--enable-prompt-tokens-details", action="store_true")
    g.add_argument("--enable-force-include-usage", action="store_true",
                   help="Every streamed completion ends with a usage chunk, as if the request had asked with "
                        "stream_options.include_usage.")
    g.add_argument("--served-model-name", nargs="+", default=None)
    g.add_argument("--lora-modules", nargs="+", type=parse_lora_module, default=None,
                   help="LoRA adapters to serve (needs --enable-lora): name=path, or JSON "
                        '\'{"name": "sql", "path": "/adapters/sql", "base_model_name": "base"}\' (or a JSON list).')
    g.add_argument("--lora-allowed-dirs", nargs="+", default=None,
                   help="lmserve: directories from which POST /v1/load_lora_adapter may load adapters (paths are "
                        "resolved, '..' and symbolic links included, and must stay inside one). Without it, "
                        "adapters cannot be loaded by path at run time.")
    g.add_argument("--rope-scaling", type=json.loads, default=None, help="Applied as an --hf-overrides entry.")
    g.add_argument("--rope-theta", type=float, default=None, help="Applied as an --hf-overrides entry.")
    add_frontend_args(g)
    add_tool_reasoning_args(parser)
    add_api_args(g)
    n = parser.add_argument_group("vllm flags that change nothing on this build (accepted, logged at start-up)")
    for flag, kwargs, why in NOOP_FLAGS:
        n.add_argument(flag, default=None, help=f"No-op here: {why}.", **kwargs)
    EngineArgs.add_cli_args(parser)
    known = {opt for action in parser._actions for opt in action.option_strings}  # noqa: SLF001
    u = parser.add_argument_group("vllm flags that cannot apply here (refused when set)")
    for flag, (kwargs, _, _) in _UNSUPPORTED.items():
        if flag not in known:  # the engine may learn a flag later: then its definition wins
            u.add_argument(flag, default=None, help=argparse.SUPPRESS, **kwargs)
    parser.set_defaults(foreign_flags=register_foreign_flags(parser))
    return regroup_as_vllm(parser)


def _dest_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> action, for every long flag name (dashes and underscores alike)."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public listing
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:]] = action
                out[opt[2:].replace("-", "_")] = action
    return out


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The YAML file as ``{dest: value}`` defaults for ``parser``; unknown keys are errors."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read the file ({e})") from e
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    actions = _dest_of(parser)
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key).lstrip("-")
        if key == "model":
            defaults["model"] = value
            continue
        action = actions.get(key)
        if action is None or key == "config":
            raise ValueError(f"--config {path}: unknown option {key!r}")
        if action.nargs in ("+", "*") and not isinstance(value, list):
            value = [value]
        if isinstance(value, (dict, list)) and action.type is json.loads:
            pass  # already parsed
        elif isinstance(value, list) and action.type is _json_list:
            value = [str(v) for v in value]
        if action.choices is not None and value not in action.choices and not (
                isinstance(value, str) and action.type is not None):
            raise ValueError(f"--config {path}: {key}={value!r} is not one of {list(action.choices)}")
        defaults[action.dest] = value
    return defaults


def _find_config(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def finalize_serve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Resolves MODEL, the API key from the environment, --rope-* overrides, and refuses the
    flags that cannot apply (``parser.error`` exits with status 2)."""
    if args.model_tag is not None:
        args.model = args.model_tag
    args.noop_flags = [f"{flag} {'' if isinstance(getattr(args, _dest(flag)), bool) else getattr(args, _dest(flag))} "
                       f"changes nothing on this build: {why}".replace("  ", " ")
                       for flag, _, why in NOOP_FLAGS if getattr(args, _dest(flag), None) is not None]
    if args.disable_log_requests:
        args.enable_log_requests = False
    for flag in ("max_request_body_bytes", "max_stop_strings", "h11_max_incomplete_event_size",
                 "h11_max_header_count"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.shutdown_timeout < 0:
        parser.error("--shutdown-timeout must be 0 or more")
    if getattr(args, "structured_outputs_config", None) is not None:
        from lmserve.structured_output.config import StructuredOutputsConfig
        try:
            args.structured_outputs_config = StructuredOutputsConfig.from_cli(args.structured_outputs_config)
        except (TypeError, ValueError) as e:
            parser.error(str(e))
    if getattr(args, "logits_processor_pattern", None) is not None:
        try:
            re.compile(args.logits_processor_pattern)
        except re.error as e:
            parser.error(f"--logits-processor-pattern is not a valid regular expression: {e}")
    if args.api_key is None:
        args.api_key = os.environ.get("VLLM_API_KEY") or os.environ.get("LMSERVE_API_KEY") or None
    if isinstance(args.served_model_name, str):
        args.served_model_name = [args.served_model_name]
    known = {opt: action for action in parser._actions for opt in action.option_strings}  # noqa: SLF001
    for flag, (kwargs, accepted, why) in _UNSUPPORTED.items():
        dest = kwargs.get("dest") or flag.lstrip("-").replace("-", "_")
        if known.get(flag) is None or known[flag].help != argparse.SUPPRESS:
            continue  # defined by the engine, not refused here
        value = getattr(args, dest, None)
        if value is None:
            continue
        try:
            ok = accepted(value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            parser.error(f"{flag} {'' if value is True else value!s} is not supported: {why}.".replace("  ", " "))
    from lmserve.config import generation_config_problem
    from lmserve.tokenizer import check_tokenizer_mode
    try:
        check_tokenizer_mode(args.tokenizer_mode)
    except ValueError as e:
        parser.error(str(e))
    problem = generation_config_problem(args.generation_config)
    if problem is not None:
        parser.error(problem)
    try:
        check_tool_reasoning_args(args)
    except ValueError as e:
        parser.error(str(e))
    notes, errors = check_foreign_flags(args, getattr(args, "foreign_flags", None) or {})
    if errors:
        parser.error(" ".join(errors))
    args.noop_flags += notes
    overrides: dict[str, Any] = {}
    if args.rope_scaling is not None:
        overrides["rope_scaling"] = args.rope_scaling
    if args.rope_theta is not None:
        overrides["rope_theta"] = args.rope_theta
    if overrides:
        base = args.hf_overrides or {}
        args.hf_overrides = {**(json.loads(base) if isinstance(base, str) else base), **overrides}
    return args


def _json_value(text: str) -> Any:
    """A dotted flag's value: JSON where it parses (numbers, booleans, lists, objects), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def normalize_argv(argv: list[str]) -> list[str]:
    """vLLM's spellings of long flags, as its ``FlexibleArgumentParser`` takes them:
    ``--max_model_len 5000`` is ``--max-model-len 5000`` (underscores in the name, not the value);
    ``--hf-overrides.rope_theta 1e5`` / ``--x.a.b=v`` set keys of the JSON flag ``--x`` (nested by
    the dots, the value read as JSON where it parses, ``true`` when no value follows), merged over
    an explicit ``--x '{...}'`` wherever that stands. Everything else is left as it is."""
    out: list[str] = []
    dotted: dict[str, dict[str, Any]] = {}
    explicit: dict[str, int] = {}  # JSON flag -> index of its value in ``out``
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            out.extend(argv[i - 1:])
            break
        if not token.startswith("--") or len(token) == 2:
            out.append(token)
            continue
        name, eq, value = token[2:].partition("=")
        base, dot, path = name.partition(".")
        base = base.replace("_", "-")
        if not dot:
            out.append(f"--{base}{eq}{value}")
            if not eq and i < len(argv) and not argv[i].startswith("--"):
                explicit.setdefault(base, len(out))
            elif eq:
                explicit.setdefault(base, len(out) - 1)
            continue
        if not eq:
            if i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            else:
                value = "true"
        node = dotted.setdefault(base, {})
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"--{name}: {key} is set both as a value and as an object")
        node[keys[-1]] = _json_value(value)
    for base, values in dotted.items():
        if base in explicit:
            at = explicit[base]
            raw = out[at].split("=", 1)[1] if out[at].startswith("--") else out[at]
            merged = {**(_json_value(raw) if isinstance(_json_value(raw), dict) else {}), **values}
            out[at] = f"--{base}={json.dumps(merged)}" if out[at].startswith("--") else json.dumps(merged)
        else:
            out += [f"--{base}", json.dumps(values)]
    return out


def parse_serve_args(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parses ``lmserve serve`` arguments (without the word ``serve``), config file included.
    Long flags may be spelled as vLLM's parser takes them (``normalize_argv``)."""
    if parser is None:
        parser = add_server_args(make_serve_parser(prog="lmserve serve"))
    keyword = help_keyword(argv)
    if keyword is not None:
        print(filtered_help(parser, keyword), end="")
        raise SystemExit(0)
    try:
        argv = normalize_argv(argv)
    except ValueError as e:
        parser.error(str(e))
    config = _find_config(argv)
    if config is not None:
        try:
            parser.set_defaults(**load_config_file(config, parser))
        except ValueError as e:
            parser.error(str(e))
    return finalize_serve_args(parser.parse_args(argv), parser)
