"""Benchmarks run as ``lmserve bench NAME [flags]``.

Each module ``lmserve.benchmarks.NAME`` exposes ``main(argv: list[str]) -> int | None``;
``lmserve bench`` (see ``lmserve.entrypoints.cli``) imports it lazily, so a benchmark's
dependencies cost nothing to ``lmserve serve``.

- ``serve`` (the default): a load generator against any OpenAI-compatible server that prints
  the same figures as ``vllm bench serve`` (TTFT, TPOT, ITL, E2EL, token throughput).
"""
