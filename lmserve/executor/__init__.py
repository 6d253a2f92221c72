"""Executors: how the engine core runs a step on one rank or several (``base.Executor``)."""
