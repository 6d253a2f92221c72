"""The README's table of ``vllm serve`` flags is current, and every vLLM flag has an answer."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmserve.entrypoints import cli_args
from lmserve.entrypoints.help_groups import LMSERVE_GROUP, filtered_help, vllm_flag_groups

ROOT = Path(__file__).resolve().parent.parent


def _flag_table():
    spec = importlib.util.spec_from_file_location("flag_table", ROOT / "tools" / "flag_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_vllm_flag_has_an_answer():
    missing = [flag for flag, _, answer, _ in _flag_table().rows() if answer == "MISSING"]
    assert missing == [], f"vllm serve flags lmserve does not know: {missing}"


def test_readme_table_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "flag_table.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def _parser():
    return cli_args.add_server_args(cli_args.make_serve_parser(prog="lmserve serve"))


def test_help_is_grouped_as_vllm_with_defaults():
    parser = _parser()
    by_flag, order = vllm_flag_groups()
    titles = [g.title for g in parser._action_groups if g._group_actions]
    vllm_titles = [t for t in titles if t in order]
    assert vllm_titles == sorted(vllm_titles, key=order.index)  # vLLM's order
    for group in parser._action_groups:
        for action in group._group_actions:
            if not action.option_strings:
                continue
            vllm_group = next((by_flag[o][0] for o in action.option_strings if o in by_flag), LMSERVE_GROUP)
            assert group.title == {"options": "general"}.get(vllm_group, vllm_group), action.option_strings
    text = parser.format_help()
    assert "--max-model-len" in text and re.search(r"\(default:\s+16\)", text)  # --block-size's


@pytest.mark.parametrize("keyword, present, absent", [
    ("CacheConfig", "--block-size", "--max-model-len"),
    ("cacheconfig", "--block-size", "--port"),
    ("max_model_len", "--max-model-len", "--block-size"),
    ("no-such-flag", "No group or option matches", "--port"),
])
def test_help_keyword(keyword, present, absent):
    text = filtered_help(_parser(), keyword)
    assert present in text and absent not in text


def test_help_keyword_on_the_command_line():
    result = subprocess.run([sys.executable, "-m", "lmserve.entrypoints.cli", "serve", "--help=ModelConfig"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ModelConfig:") and "--max-model-len" in result.stdout
