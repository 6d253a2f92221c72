"""The LoRA adapters a server serves by name: ``--lora-modules`` at start-up, and
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` at run time.

Contracts:
- a request picks an adapter by ``model``; a name that is neither a served model nor an adapter
  is a 404 ``NotFoundError`` (``OpenAIServing.resolve_model``);
- the run-time routes exist only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` or
  ``LMSERVE_ALLOW_RUNTIME_LORA_UPDATING`` set to ``1``/``true`` (as vLLM: otherwise they are 404s);
- a run-time load reads only from ``--lora-allowed-dirs``: the directory and the files read from
  it are resolved (``os.path.realpath``, so ``..`` and symlinks are followed) and must lie inside an
  allowed directory; without the flag, loading by path is refused. ``--lora-modules`` paths come
  from the operator and are not restricted;
- every load gets a new adapter id (``load_inplace`` too), so the prefix cache never serves blocks
  computed with an adapter's previous weights;
- unloading forgets the name at once (new requests get a 404) and drops the engine's cached copy;
  requests already running hold their adapter's weights and finish with them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from lmserve.errors import InvalidRequestError, NotFoundError
from lmserve.lora.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lmserve.lora.request import LoRARequest

logger = logging.getLogger("lmserve.server")

RUNTIME_UPDATE_ENVS = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "LMSERVE_ALLOW_RUNTIME_LORA_UPDATING")


class LoadLoRAAdapterRequest(BaseModel):
    """Body of POST /v1/load_lora_adapter (vLLM's fields; ``is_3d_lora_weight`` concerns MoE adapters)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None


def runtime_updates_allowed(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(k, "0").strip().lower() in ("1", "true") for k in RUNTIME_UPDATE_ENVS)


@dataclass(frozen=True)
class LoRAModulePath:
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(value: str) -> list[LoRAModulePath]:
    """One ``--lora-modules`` item: ``name=path``, a JSON object ``{"name", "path",
    "base_model_name"?}`` or a JSON list of them (vLLM's three forms)."""
    value = value.strip()
    if value.startswith(("{", "[")):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--lora-modules: invalid JSON {value!r}: {e}") from None
        out = []
        for item in data if isinstance(data, list) else [data]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(
                    item.get("path"), str) or set(item) - {"name", "path", "base_model_name"}:
                raise argparse.ArgumentTypeError(
                    f'--lora-modules: expected {{"name": ..., "path": ..., "base_model_name": ...}}, got {item!r}')
            out.append(LoRAModulePath(item["name"], item["path"], item.get("base_model_name")))
        return out
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules: expected name=path or JSON, got {value!r}")
    return [LoRAModulePath(name, path)]


def _inside(path: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([path, root]) == root for root in roots)


class ServedLoRAs:
    """Name -> ``LoRARequest`` of the adapters served, and their loading (see the module docstring).
    ``engine`` is the ``AsyncLLM``; ``base_names`` the served model names (adapters cannot take one)."""

    def __init__(self, engine: Any, base_names: tuple[str, ...], allowed_dirs: list[str] | None) -> None:
        self.engine = engine
        self.base_names = base_names
        self.allowed_dirs = [os.path.realpath(d) for d in allowed_dirs or []]
        self._adapters: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ lookups
    def get(self, name: str) -> LoRARequest | None:
        return self._adapters.get(name)

    def all(self) -> list[LoRARequest]:
        return list(self._adapters.values())

    # ------------------------------------------------------------------ start-up
    def add_static(self, modules: list[LoRAModulePath]) -> None:
        """``--lora-modules``: loaded (and checked) now, in the start-up thread; ValueError on a bad one."""
        for m in modules:
            if m.name in self.base_names or m.name in self._adapters:
                raise ValueError(f"--lora-modules: the name {m.name!r} is already served")
            req = LoRARequest(m.name, next(self._ids), os.path.realpath(m.path),
                              base_model_name=m.base_model_name or self.base_names[0])
            self.engine.engine.get_lora(req)
            self._adapters[m.name] = req
            logger.info("LoRA adapter %r served from %s", m.name, req.lora_path)

    # ------------------------------------------------------------------ run time
    def _checked_path(self, path: str) -> str:
        if not self.allowed_dirs:
            raise InvalidRequestError("Loading LoRA adapters by path is disabled: start the server with "
                                      "--lora-allowed-dirs DIR to allow adapters from DIR", "lora_path")
        real = os.path.realpath(path)
        files = [real] + [os.path.realpath(os.path.join(real, f)) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]
        if not all(_inside(f, self.allowed_dirs) for f in files):
            raise InvalidRequestError("lora_path is outside the directories allowed by --lora-allowed-dirs "
                                      "(after resolving '..' and symbolic links)", "lora_path")
        return real

    async def load(self, name: str, path: str, load_inplace: bool = False) -> str:
        if not name or not path:
            raise InvalidRequestError("Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.base_names:
            raise InvalidRequestError(f"The lora adapter '{name}' conflicts with a served base model.", "lora_name")
        real = self._checked_path(path)
        async with self._lock:
            if name in self._adapters and not load_inplace:
                raise InvalidRequestError(f"The lora adapter '{name}' has already been loaded. If you want to load "
                                          "the adapter in place, set 'load_inplace' to True.", "lora_name")
            req = LoRARequest(name, next(self._ids), real, base_model_name=self.base_names[0])
            try:
                await asyncio.to_thread(self.engine.engine.get_lora, req)
            except ValueError as e:
                raise InvalidRequestError(f"Cannot load LoRA adapter '{name}': {e}", "lora_path") from e
            previous = self._adapters.get(name)
            self._adapters[name] = req
            if previous is not None:
                self.engine.engine.remove_lora(previous.lora_int_id)
        logger.info("Loaded LoRA adapter %r from %s", name, real)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, name: str, lora_int_id: int | None = None) -> str:
        if not name:
            raise InvalidRequestError("'lora_name' needs to be provided to unload a LoRA adapter.", "lora_name")
        async with self._lock:
            req = self._adapters.get(name)
            if req is None or (lora_int_id is not None and lora_int_id != req.lora_int_id):
                raise NotFoundError(f"The lora adapter '{name}' cannot be found.", "lora_name")
            del self._adapters[name]
            self.engine.engine.remove_lora(req.lora_int_id)
        logger.info("Removed LoRA adapter %r", name)
        return f"Success: LoRA adapter '{name}' removed successfully."
