"""``vllm serve`` flags about the HTTP front end and logging: the listening socket, TLS ciphers,
the access log and the process's log level (vLLM 0.32's names, defaults and meaning).

``add_frontend_args`` registers them; ``apply_logging`` configures logging once the flags are
parsed; ``uvicorn_options`` and ``AccessLogFilter`` carry the rest into the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.config
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_LOGGING_CONFIG_KEYS = ("log_level", "formatter", "configure_logging", "pylogging_config_file")


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_frontend_args(g: argparse._ArgumentGroup) -> None:  # noqa: SLF001 - argparse's group type
    """Registers the flags on ``g`` (the server group)."""
    g.add_argument("--uds", default=None, help="Unix domain socket path. If set, --host and --port are ignored.")
    g.add_argument("--ssl-ciphers", default=None, help="SSL cipher suites for HTTPS (TLS 1.2 and below), "
                   "OpenSSL's syntax. Default: uvicorn's.")
    g.add_argument("--disable-uvicorn-access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="Disable uvicorn's access log.")
    g.add_argument("--disable-access-log-for-endpoints", default=None,
                   help="Comma-separated paths (e.g. /health,/metrics) left out of the access log.")
    g.add_argument("--log-level", default=None, type=str.lower, choices=LOG_LEVELS,
                   help="Log level of the server process (shortcut for --logging-config.log_level). "
                        "Default: info, or $VLLM_LOGGING_LEVEL / $LMSERVE_LOGGING_LEVEL.")
    g.add_argument("--logging-config", default=None, type=json.loads,
                   help="JSON: log_level, formatter (text), configure_logging, pylogging_config_file (a "
                        "logging.config.dictConfig JSON file that then rules every logger). Dotted keys work: "
                        "--logging-config.log_level debug.")
    g.add_argument("--log-config-file", default=None,
                   help="Deprecated in vLLM: --logging-config.pylogging_config_file.")
    g.add_argument("--enable-log-outputs", action=argparse.BooleanOptionalAction, default=False,
                   help="With --enable-log-requests: log each request's output text, token ids and finish "
                        "reason at INFO.")
    g.add_argument("--enable-log-deltas", action=argparse.BooleanOptionalAction, default=True,
                   help="With --enable-log-outputs: a streamed request also logs each delta.")
    g.add_argument("--default-chat-template-kwargs", type=_json_object, default=None,
                   help='JSON object of chat template variables for every chat request (e.g. '
                        '\'{"enable_thinking": false}\'); a request\'s chat_template_kwargs win key by key.')
    g.add_argument("--sse-keep-alive-interval", type=float, default=0,
                   help="Send an SSE comment line (': keep-alive') every this many seconds while a streamed "
                        "/v1/chat/completions or /v1/completions response is idle. 0 (default): never.")
    g.add_argument("--log-error-stack", action=argparse.BooleanOptionalAction, default=False,
                   help="Log the stack trace of every error response, not only of internal errors.")


def resolve_logging_config(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, Any]:
    """The effective logging config: --logging-config, then --log-level and --log-config-file over
    it, then the environment for what is still unset. Raises ValueError for unknown keys/values."""
    config = dict(getattr(args, "logging_config", None) or {})
    unknown = sorted(set(config) - set(_LOGGING_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"--logging-config: unknown keys {unknown}; lmserve takes {list(_LOGGING_CONFIG_KEYS)}")
    if getattr(args, "log_level", None):
        config["log_level"] = args.log_level
    if getattr(args, "log_config_file", None):
        config["pylogging_config_file"] = args.log_config_file
    level = str(config.get("log_level") or environ.get("VLLM_LOGGING_LEVEL") or
                environ.get("LMSERVE_LOGGING_LEVEL") or "info").lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {list(LOG_LEVELS)}")
    formatter = config.get("formatter", "text")
    if formatter != "text":
        raise ValueError(f"--logging-config formatter {formatter!r} is not supported: lmserve logs text lines")
    return {"log_level": level, "configure_logging": bool(config.get("configure_logging", True)),
            "pylogging_config_file": config.get("pylogging_config_file") or environ.get("VLLM_LOGGING_CONFIG_PATH")}


def apply_logging(config: dict[str, Any]) -> None:
    """Applies ``resolve_logging_config``'s result to this process's loggers."""
    if not config["configure_logging"]:
        return
    path = config["pylogging_config_file"]
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                logging.config.dictConfig(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"logging config file {path}: {e}") from e
        return
    logging.getLogger().setLevel(config["log_level"].upper())


class AccessLogFilter(logging.Filter):
    """Drops uvicorn access-log records for the given paths (query strings ignored)."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__()
        self.paths = frozenset(paths)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3:  # (client, method, path, http version, status)
            return str(args[2]).split("?", 1)[0] not in self.paths
        return True


def uvicorn_options(args: argparse.Namespace) -> dict[str, Any]:
    """The uvicorn.Config keyword arguments these flags set."""
    out: dict[str, Any] = {"access_log": not getattr(args, "disable_uvicorn_access_log", False)}
    if getattr(args, "uds", None):
        out["uds"] = args.uds
    if getattr(args, "ssl_ciphers", None):
        out["ssl_ciphers"] = args.ssl_ciphers
    return out


def install_access_log_filter(args: argparse.Namespace) -> None:
    """Installs ``AccessLogFilter`` on uvicorn's access logger when paths are given."""
    raw = getattr(args, "disable_access_log_for_endpoints", None)
    paths = [p.strip() for p in (raw or "").split(",") if p.strip()]
    if paths:
        logging.getLogger("uvicorn.access").addFilter(AccessLogFilter(paths))
