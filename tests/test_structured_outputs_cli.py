"""``--structured-outputs-config`` in vLLM's spellings (JSON, dotted keys, config file) and its
start-up refusals; ``--logits-processor-pattern`` validation."""

from __future__ import annotations

import pytest

from lmserve.engine.arg_utils import EngineArgs
from lmserve.entrypoints.cli_args import parse_serve_args
from lmserve.structured_output.config import StructuredOutputsConfig


@pytest.mark.parametrize("argv, expected", [
    ([], None),
    (["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'],
     StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)),
    (["--structured-outputs-config.backend", "xgrammar"], StructuredOutputsConfig(backend="xgrammar")),
    (["--structured-outputs-config.backend=auto", "--structured-outputs-config.disable_any_whitespace"],
     StructuredOutputsConfig(disable_any_whitespace=True)),
    (["--structured_outputs_config.compile_timeout_s", "2.5", "--structured-outputs-config.enable_in_reasoning",
      "true"], StructuredOutputsConfig(compile_timeout_s=2.5, enable_in_reasoning=True)),
])
def test_forms(argv, expected):
    args = parse_serve_args(argv)
    assert args.structured_outputs_config == expected
    assert EngineArgs.from_cli_args(args).structured_outputs_config == expected


def test_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("structured-outputs-config:\n  backend: xgrammar\n  disable_additional_properties: true\n")
    args = parse_serve_args(["--config", str(cfg)])
    assert args.structured_outputs_config == StructuredOutputsConfig(backend="xgrammar",
                                                                     disable_additional_properties=True)


@pytest.mark.parametrize("argv, fragment", [
    (["--structured-outputs-config.backend", "guidance"], "backend 'guidance' is not available in lmserve"),
    (["--structured-outputs-config.backend", "outlines"], "xgrammar"),
    (["--structured-outputs-config", '{"backend": "lm-format-enforcer"}'], "xgrammar"),
    (["--structured-outputs-config.reasoning_parser", "deepseek_r1"], "--reasoning-parser"),
    (["--structured-outputs-config.bogus", "1"], "unknown key(s) ['bogus']"),
    (["--structured-outputs-config", "not json"], "must be a JSON object"),
    (["--structured-outputs-config.compile_timeout_s", "0"], "compile_timeout_s"),
    (["--guided-decoding-backend", "outlines"], "--structured-outputs-config.backend"),
    (["--logits-processor-pattern", "(unclosed"], "not a valid regular expression"),
])
def test_refusals(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        parse_serve_args(argv)
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err
