"""The answers to vLLM flags lmserve does not implement (lmserve/entrypoints/vllm_flags.py) and the
front-end/logging flags (frontend_flags.py), at the parser level."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from lmserve.entrypoints.cli_args import parse_serve_args
from lmserve.entrypoints.frontend_flags import AccessLogFilter, resolve_logging_config, uvicorn_options
from lmserve.entrypoints.vllm_flags import FOREIGN_FLAGS


def _refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as e:
        parse_serve_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_refused_flags_name_the_reason(capsys: pytest.CaptureFixture) -> None:
    err = _refused(["--enable-expert-parallel"], capsys)
    assert "--enable-expert-parallel is not supported: expert parallelism" in err
    err = _refused(["-dpl", "2"], capsys)
    assert "--data-parallel-size-local 2 is not supported" in err and "load balancer" in err
    err = _refused(["--attention-backend", "FLASH_ATTN"], capsys)
    assert "LMSERVE_CPU_GEMM" in err


def test_flags_keeping_vllm_default_are_accepted_and_noops_logged() -> None:
    args = parse_serve_args(["--no-enable-expert-parallel", "--mm-processor-cache-gb", "4", "--moe-backend", "auto",
                             "--optimization-level", "3", "--safetensors-load-strategy", "lazy",
                             "--no-use-tqdm-on-load", "--disable-cascade-attn"])
    lines = "\n".join(args.noop_flags)
    assert "--optimization-level 3 changes nothing on this build" in lines
    assert "--no-use-tqdm-on-load changes nothing" in lines and "--disable-cascade-attn changes nothing" in lines
    assert "expert" not in lines and "mm-processor" not in lines  # refused-unless-default ones log nothing


def test_dotted_and_underscore_spellings_reach_foreign_flags(capsys: pytest.CaptureFixture) -> None:
    args = parse_serve_args(["--data_parallel_backend", "mp", "--additional_config", "{}"])
    assert args.foreign_data_parallel_backend == "mp" and args.foreign_additional_config == "{}"
    err = _refused(["--kernel-config.moe_backend", "triton"], capsys)
    assert json.dumps({"moe_backend": "triton"}) in err and "LMSERVE_CPU_GEMM" in err


def test_foreign_flag_entries_are_unique_and_explained() -> None:
    names = [f.flag for f in FOREIGN_FLAGS]
    assert len(names) == len(set(names))
    for entry in FOREIGN_FLAGS:
        assert entry.flag.startswith("--") and entry.why and not entry.why.endswith(".")
        assert entry.answer in ("noop", "refused")


def test_frontend_flags_reach_uvicorn_and_logging() -> None:
    args = parse_serve_args(["--uds", "/tmp/x.sock", "--ssl-ciphers", "ECDHE-RSA-AES256-GCM-SHA384",
                             "--disable-uvicorn-access-log", "--log-level", "DEBUG"])
    assert uvicorn_options(args) == {"access_log": False, "uds": "/tmp/x.sock",
                                     "ssl_ciphers": "ECDHE-RSA-AES256-GCM-SHA384"}
    assert resolve_logging_config(args, {})["log_level"] == "debug"
    dotted = parse_serve_args(["--logging-config.log_level", "warning"])
    assert resolve_logging_config(dotted, {})["log_level"] == "warning"
    assert resolve_logging_config(parse_serve_args([]), {"VLLM_LOGGING_LEVEL": "ERROR"})["log_level"] == "error"
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_logging_config(parse_serve_args(["--logging-config", '{"colour": 1}']), {})
    with pytest.raises(ValueError, match="formatter"):
        resolve_logging_config(parse_serve_args(["--logging-config.formatter", "json"]), {})


def test_access_log_filter_drops_listed_paths_only() -> None:
    keep = AccessLogFilter(["/health", "/metrics"])

    def record(path: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                 ("1.2.3.4:5", "GET", path, "1.1", 200), None)

    assert not keep.filter(record("/health")) and not keep.filter(record("/metrics?x=1"))
    assert keep.filter(record("/v1/models"))
    assert isinstance(argparse.Namespace(), argparse.Namespace)


def test_executor_backends_refused_with_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from lmserve.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="external_launcher is not supported"):
        EngineArgs(model="unused", distributed_executor_backend="external_launcher").create_engine_config()
    with pytest.raises(ValueError, match="uni runs one rank"):
        EngineArgs(model="unused", tensor_parallel_size=2, distributed_executor_backend="uni").create_engine_config()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install ray.*--distributed-executor-backend mp"):
        EngineArgs(model="unused", distributed_executor_backend="ray").create_engine_config()


def test_tool_server_and_strict_level_are_refused_with_reasons(capsys: pytest.CaptureFixture) -> None:
    err = _refused(["--tool-server", "demo"], capsys)
    assert "--tool-server demo is not supported" in err and "role" in err
    err = _refused(["--tool-strict-level", "parameter"], capsys)
    assert "--tool-strict-level parameter is not supported" in err
    parse_serve_args(["--tool-strict-level", "auto"])


def test_tool_and_reasoning_flags(capsys: pytest.CaptureFixture, tmp_path) -> None:
    args = parse_serve_args(["--enable-auto-tool-choice", "--tool-call-parser", "qwen3_xml", "--reasoning-parser",
                             "deepseek_r1", "--reasoning-config", '{"reasoning_end_str": "Answer:</think>"}',
                             "--exclude-tools-when-tool-choice-none"])
    assert (args.tool_call_parser, args.reasoning_parser) == ("qwen3_xml", "deepseek_r1")
    assert args.reasoning_config.reasoning_end_str == "Answer:</think>" and args.exclude_tools_when_tool_choice_none
    assert "requires --tool-call-parser" in _refused(["--enable-auto-tool-choice"], capsys)
    assert "invalid tool call parser: nope" in _refused(["--tool-call-parser", "nope"], capsys)
    assert "invalid reasoning parser: nope" in _refused(["--reasoning-parser", "nope"], capsys)
    assert "unknown key" in _refused(["--reasoning-config", '{"x": 1}'], capsys)
    plugin = tmp_path / "cli_plugin.py"
    plugin.write_text("from lmserve.reasoning import ReasoningParser, ReasoningParserManager\n"
                      "@ReasoningParserManager.register_module('cli_plugin_test')\n"
                      "class P(ReasoningParser):\n    pass\n")
    args = parse_serve_args(["--reasoning-parser-plugin", str(plugin), "--reasoning-parser", "cli_plugin_test"])
    assert args.reasoning_parser == "cli_plugin_test"
    assert "no such file" in _refused(["--tool-parser-plugin", str(tmp_path / "x.py")], capsys)
