"""Writes the flags of ``vllm serve`` as JSON (run with vLLM's own interpreter, never lmserve's).

    VLLM_TARGET_DEVICE=cpu ~/.cache/lmserve-anchors/vllm-cpu/bin/python tools/dump_vllm_serve_flags.py \
        > lmserve/entrypoints/vllm_serve_flags.json

The output is the reference list that ``tools/flag_table.py`` compares lmserve's parser against. It is
committed, so the comparison (and its test) runs where vLLM is not installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import sys


def _vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    raise SystemExit("vLLM is not installed in this interpreter")


def main() -> None:
    version = _vllm_version()
    real_version = metadata.version
    metadata.version = lambda name: version if name == "vllm" else real_version(name)  # the CPU wheel's name
    sys.argv = ["vllm", "serve", "--help"]  # vLLM fills in help texts only for a --help run (read at import)
    from vllm.entrypoints.launchers.cli_args import make_arg_parser  # noqa: PLC0415 - vLLM only
    from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: PLC0415

    parser = make_arg_parser(FlexibleArgumentParser())
    group_of = {id(a): g.title for g in parser._action_groups for a in g._group_actions}  # noqa: SLF001
    flags = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public listing
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        flags.append({
            "flag": (longs or action.option_strings)[0],
            "aliases": [o for o in action.option_strings if o != (longs or action.option_strings)[0]],
            "group": group_of.get(id(action), ""),
            "default": action.default if isinstance(action.default, (str, int, float, bool, type(None)))
            else repr(action.default),
            "help": " ".join((action.help or "").split()),
        })
    json.dump({"vllm_version": version, "flags": flags}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
