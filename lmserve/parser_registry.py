"""``ParserRegistry``: the registry shape of vLLM's ``ToolParserManager`` and
``ReasoningParserManager``, written once for both.

The registry is class-level (each subclass holds its own dicts, under vLLM's attribute names) so
that a plugin file's ``@Manager.register_module("name")`` reaches it without a handle; it only
grows, at import and from plugin files at start-up, before any request is served.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, ClassVar


def _names(name: str | list[str] | None, default: str) -> list[str]:
    if name is None:
        return [default]
    if isinstance(name, str):
        return [name]
    if isinstance(name, list) and all(isinstance(n, str) for n in name):
        return list(name)
    raise TypeError("name must be a str, a list of str, or None")


def import_plugin_file(path: str, kind: str) -> None:
    """Imports a plugin file (``--tool-parser-plugin`` / ``--reasoning-parser-plugin``) so that its
    ``register_module`` decorators run. Raises ValueError naming the file when it cannot."""
    if not os.path.isfile(path):
        raise ValueError(f"{kind} {path!r}: no such file")
    module_name = "lmserve_plugin_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{kind} {path!r}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - reported with the file name
        sys.modules.pop(module_name, None)
        raise ValueError(f"{kind} {path!r} failed to import: {type(e).__name__}: {e}") from e


class ParserRegistry:
    """Subclasses set ``_base`` (the parser base class), ``_label`` (for messages), ``_registered``
    (their vLLM-named dict of classes) and ``lazy_parsers`` (name -> (module, class), imported on
    first use)."""

    _base: ClassVar[type]
    _label: ClassVar[str]
    _registered: ClassVar[dict[str, type]]
    lazy_parsers: ClassVar[dict[str, tuple[str, str]]]

    @classmethod
    def _lookup(cls, name: str) -> Any:
        if name in cls._registered:
            return cls._registered[name]
        if name in cls.lazy_parsers:
            module_path, class_name = cls.lazy_parsers[name]
            parser_cls = getattr(importlib.import_module(module_path), class_name)
            if not (isinstance(parser_cls, type) and issubclass(parser_cls, cls._base)):
                raise TypeError(f"{class_name} in {module_path} is not a {cls._base.__name__} subclass")
            cls._registered[name] = parser_cls
            return parser_cls
        raise KeyError(f"{cls._label} '{name}' not found. Registered: {', '.join(cls.list_registered())}")

    @classmethod
    def register_lazy_module(cls, name: str, module_path: str, class_name: str) -> None:
        cls.lazy_parsers[name] = (module_path, class_name)

    @classmethod
    def register_module(cls, name: str | list[str] | None = None, force: bool = True,
                        module: type | None = None) -> Any:
        """``@Manager.register_module("name")`` on a parser subclass, or
        ``register_module("name", module=Cls)``. ``force=False`` refuses a taken name."""
        if not isinstance(force, bool):
            raise TypeError(f"force must be a boolean, but got {type(force)}")

        def register(obj: type) -> type:
            if not (isinstance(obj, type) and issubclass(obj, cls._base)):
                raise TypeError(f"module must be a subclass of {cls._base.__name__}, but got {obj!r}")
            for n in _names(name, obj.__name__):
                if not force and (n in cls._registered or n in cls.lazy_parsers):
                    raise KeyError(f"{n} is already registered")
                cls._registered[n] = obj
            return obj

        return register(module) if module is not None else register

    @classmethod
    def list_registered(cls) -> list[str]:
        return sorted(set(cls._registered) | set(cls.lazy_parsers))
