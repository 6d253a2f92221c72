"""Distributed execution: the parallel layout of one rank (``parallel_state``), its collectives,
and the executors that run a model over several ranks (see docs/architecture.md)."""
