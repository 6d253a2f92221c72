"""Loading custom logits processors and building the engine's processor set.

Custom processors come from (a) installed plugins, discovered through the entry-point
groups ``lmserve.logits_processors`` and ``vllm.logits_processors`` (so a vLLM plugin
package loads unchanged), and (b) what the user names: classes, or strings
``"pkg.module:Class"`` (vLLM's form, ``Class`` may be dotted) or ``"pkg.module.Class"``.
"""

from __future__ import annotations

import importlib
import itertools
import logging
from collections.abc import Iterable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import torch

from lmserve.sampling_params import SamplingParams
from lmserve.worker.logits_processors.builtin import BUILTIN_LOGITS_PROCESSORS
from lmserve.worker.logits_processors.interface import LogitsProcessor, LogitsProcessors

if TYPE_CHECKING:
    from lmserve.config import EngineConfig

logger = logging.getLogger(__name__)

LOGITSPROCS_GROUP = "lmserve.logits_processors"
VLLM_LOGITSPROCS_GROUP = "vllm.logits_processors"
PLUGIN_GROUPS: tuple[str, ...] = (LOGITSPROCS_GROUP, VLLM_LOGITSPROCS_GROUP)


def _check_class(obj: Any, name: str) -> type[LogitsProcessor]:
    if not isinstance(obj, type):
        raise ValueError(f"Logits processor {name!r} is not a class (got {type(obj).__name__}).")
    if not issubclass(obj, LogitsProcessor):
        raise ValueError(
            f"Logits processor {name!r} ({obj.__module__}.{obj.__qualname__}) must be a subclass of "
            "lmserve.logits_processor.LogitsProcessor (vllm.v1.sample.logits_processor.LogitsProcessor).")
    return obj


def _import_module(module_path: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if module_path == missing or module_path.startswith(missing + "."):
            raise ValueError(f"Cannot load logits processor {spec!r}: no module named {missing!r}.") from e
        raise ValueError(f"Cannot load logits processor {spec!r}: importing module {module_path!r} "
                         f"failed: {e}") from e
    except Exception as e:  # the module exists but raised while importing
        raise ValueError(f"Cannot load logits processor {spec!r}: importing module {module_path!r} "
                         f"failed: {type(e).__name__}: {e}") from e


def _resolve_string(spec: str) -> type[LogitsProcessor]:
    """``"module:Qual.Name"`` or ``"module.Class"`` -> the class."""
    text = spec.strip()
    if text.count(":") == 1:
        module_path, qualname = text.split(":")
    elif ":" not in text and "." in text:
        module_path, _, qualname = text.rpartition(".")
    else:
        raise ValueError(f"Cannot load logits processor {spec!r}: expected 'package.module:ClassName' "
                         "or 'package.module.ClassName'.")
    if not module_path or not qualname:
        raise ValueError(f"Cannot load logits processor {spec!r}: expected 'package.module:ClassName' "
                         "or 'package.module.ClassName'.")
    obj = _import_module(module_path, spec)
    for attr in qualname.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"Cannot load logits processor {spec!r}: module {module_path!r} has no "
                             f"attribute {qualname!r}.")
        obj = getattr(obj, attr)
    return _check_class(obj, spec)


def load_plugin_logitsprocs(groups: Sequence[str] = PLUGIN_GROUPS) -> list[type[LogitsProcessor]]:
    """Every logits processor class advertised by installed packages' entry points."""
    classes: list[type[LogitsProcessor]] = []
    for group in groups:
        for ep in entry_points(group=group):
            try:
                obj = ep.load()
            except Exception as e:
                raise ValueError(f"Failed to load logits processor plugin {ep.name!r} = {ep.value!r} "
                                 f"(entry-point group {group!r}): {type(e).__name__}: {e}") from e
            classes.append(_check_class(obj, f"{ep.name} = {ep.value}"))
            logger.debug("Loaded logits processor plugin %s from group %s", ep.value, group)
    return classes


def _dedupe(classes: Iterable[type[LogitsProcessor]]) -> list[type[LogitsProcessor]]:
    seen: set[type] = set()
    out: list[type[LogitsProcessor]] = []
    for cls in classes:
        if cls not in seen:
            seen.add(cls)
            out.append(cls)
    return out


def load_custom_logitsprocs(specs: Sequence[type | str] | None = None,
                            include_plugins: bool = True) -> list[type[LogitsProcessor]]:
    """Resolve user-named processors (classes or strings) to classes, after the
    installed plugins (unless ``include_plugins=False``). Duplicates are dropped,
    keeping first occurrence. Raises ``ValueError`` with a clear message for a
    missing module or attribute, a non-class or a non-``LogitsProcessor`` class."""
    classes = load_plugin_logitsprocs() if include_plugins else []
    for spec in specs or ():
        if isinstance(spec, str):
            classes.append(_resolve_string(spec))
        else:
            classes.append(_check_class(spec, getattr(spec, "__name__", repr(spec))))
    return _dedupe(classes)


def build_logitsprocs(engine_config: "EngineConfig | None", device: torch.device | str,
                      custom: Sequence[type | str] | None = None,
                      is_pin_memory: bool = False) -> LogitsProcessors:
    """Instantiate the built-ins plus the custom processors.

    ``custom=None`` loads ``engine_config.logits_processors`` and the installed plugins;
    an explicit sequence is taken as the complete custom list (strings are resolved,
    plugins are not added again: pass what ``load_custom_logitsprocs`` returned).
    Every instance is built as ``cls(engine_config, device, is_pin_memory)``.
    """
    device = torch.device(device)
    if custom is None:
        custom_classes = load_custom_logitsprocs(
            tuple(getattr(engine_config, "logits_processors", ()) or ()))
    else:
        custom_classes = load_custom_logitsprocs(custom, include_plugins=False)
    classes = _dedupe(itertools.chain(BUILTIN_LOGITS_PROCESSORS, custom_classes))
    return LogitsProcessors(cls(engine_config, device, is_pin_memory) for cls in classes)


def validate_all(procs_classes: Iterable[type[LogitsProcessor]], sampling_params: SamplingParams) -> None:
    """Run every class's ``validate_params`` on a request's params, before it is queued.

    A ``ValueError`` propagates unchanged; any other exception from a processor's
    validation is turned into a ``ValueError`` naming the processor, so the caller
    always sees a client error for a bad argument.
    """
    for cls in procs_classes:
        try:
            cls.validate_params(sampling_params)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{cls.__name__} rejected the request's parameters: "
                             f"{type(e).__name__}: {e}") from e
