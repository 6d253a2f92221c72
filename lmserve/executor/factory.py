"""Picks the executor for an engine config (``base.Executor`` documents the interface)."""

from __future__ import annotations

from lmserve.config import EngineConfig
from lmserve.executor.base import Executor


def resolve_backend(backend: str | None, world_size: int) -> str:
    """vLLM's default: ``mp`` with several ranks on one machine, ``uni`` with one. ``mp`` or
    ``ray`` with one rank run as ``uni`` (the one rank is the engine's process)."""
    if world_size == 1:
        return "uni"
    return backend or "mp"


def create_executor(config: EngineConfig, logitsprocs_classes: list[type]) -> Executor:
    pc = config.parallel_config
    backend = resolve_backend(pc.distributed_executor_backend, pc.world_size)
    if backend == "uni":
        from lmserve.executor.uni_executor import UniExecutor
        return UniExecutor(config, logitsprocs_classes)
    if backend == "mp":
        from lmserve.executor.mp_executor import MultiprocExecutor
        return MultiprocExecutor(config, logitsprocs_classes)
    if backend == "ray":
        from lmserve.executor.ray_executor import RayExecutor
        return RayExecutor(config, logitsprocs_classes)
    raise ValueError(f"unknown distributed executor backend {backend!r}; choose from uni, mp, ray")
