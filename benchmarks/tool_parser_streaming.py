"""Cost of streaming a long tool call through the built-in tool parsers.

Each parser re-reads the text so far at every delta (as vLLM's do), so the cost per delta grows
with the call's length: this measures it for a ~27-30 kB ``write_file(content=<code>)`` call in
4-character deltas, the worst case a coding agent sends.

    PYTHONPATH=. python3 benchmarks/tool_parser_streaming.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

from lmserve.tool_parsers import ToolParserManager

CODE = "def f(x):\n    return x * 2  # comment with \"quotes\" and unicode é\n" * 400
CASES = {
    "hermes": "Sure.<tool_call>\n" + json.dumps({"name": "write_file", "arguments": {"path": "a.py", "content": CODE}})
              + "\n</tool_call>",
    "pythonic": "[write_file(path='a.py', content=" + repr(CODE) + ")]",
    "qwen3_xml": "<tool_call>\n<function=write_file>\n<parameter=content>\n" + CODE + "\n</parameter>\n</function>\n"
                 "</tool_call>",
}


def run(name: str, text: str, step: int = 4) -> dict:
    parser = ToolParserManager.get_tool_parser(name)(None, None)
    request = SimpleNamespace(tools=None, tool_choice="auto")
    current = ""
    start = time.perf_counter()
    for k in range(0, len(text), step):
        previous, current = current, text[:k + step]
        parser.extract_tool_calls_streaming(previous, current, current[len(previous):], [], [], [], request)
    parser.finish_streaming(current, request)
    seconds = time.perf_counter() - start
    deltas = -(-len(text) // step)
    return {"parser": name, "chars": len(text), "deltas": deltas, "seconds": round(seconds, 3),
            "ms_per_delta": round(1e3 * seconds / deltas, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write results.json and table.md here")
    args = ap.parse_args()
    rows = [run(name, text) for name, text in CASES.items()]
    table = ["| parser | call (chars) | deltas | total (s) | per delta (ms) |", "|---|---|---|---|---|"]
    table += [f"| {r['parser']} | {r['chars']} | {r['deltas']} | {r['seconds']} | {r['ms_per_delta']} |" for r in rows]
    print("\n".join(table))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
