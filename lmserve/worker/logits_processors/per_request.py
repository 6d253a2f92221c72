"""Per-request logits processors: a request's ``logits_processors`` field (vLLM's OpenAI
extra, seed 002), allowed only for qualified names matching ``--logits-processor-pattern``.

Contract:
- ``resolve_request_logits_processors(specs, pattern)`` turns each entry (a qualified name
  ``"pkg.module.Name"`` or ``{"qualname": ..., "args": [...], "kwargs": {...}}``) into a callable:
  the named object is imported and called with ``args``/``kwargs`` (as vLLM's
  ``get_logits_processors``); without a pattern, or for a name the pattern does not match, or an
  import/construction failure, it raises ``InvalidRequestError`` (400) and imports nothing;
- each resulting callable is ``fn(output_token_ids, logits_row) -> logits_row`` or
  ``fn(prompt_token_ids, output_token_ids, logits_row) -> logits_row`` (the arity decides), and
  ``RequestLogitsProcessorsAdapter`` (a built-in batch processor) applies a row's callables in
  order, before penalties and temperature (they may change the argmax).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch

from lmserve.errors import InvalidRequestError
from lmserve.sampling_params import SamplingParams
from lmserve.worker.logits_processors.interface import AdapterLogitsProcessor, RequestLogitsProcessor

_PARAM = "logits_processors"


def _import_qualname(qualname: str) -> Any:
    module_name, _, attr = qualname.rpartition(".")
    if not module_name or not attr:
        raise ValueError("a qualified name has the form package.module.Name")
    return getattr(importlib.import_module(module_name), attr)


def resolve_request_logits_processors(specs: list[Any], pattern: str | None) -> list[Callable[..., torch.Tensor]]:
    """The callables of a request's ``logits_processors`` (see the module contract)."""
    if pattern is None:
        raise InvalidRequestError("The `logits_processors` argument is not supported by this server: start it "
                                  "with --logits-processor-pattern REGEX to allow processors whose qualified names "
                                  "match REGEX.", _PARAM)
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            qualname, args, kwargs = spec, [], {}
        elif isinstance(spec, dict):
            qualname, args, kwargs = spec.get("qualname"), spec.get("args") or [], spec.get("kwargs") or {}
        else:
            qualname, args, kwargs = getattr(spec, "qualname", None), getattr(spec, "args", None) or [], \
                getattr(spec, "kwargs", None) or {}
        if not isinstance(qualname, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise InvalidRequestError(f"logits_processors.{i} must be a qualified name or an object with 'qualname' "
                                      "(string), 'args' (list) and 'kwargs' (object).", f"{_PARAM}.{i}")
        if not re.match(pattern, qualname):
            raise InvalidRequestError(f"Logits processor {qualname!r} is not allowed by this server (see the "
                                      "--logits-processor-pattern engine argument).", f"{_PARAM}.{i}")
        try:
            factory = _import_qualname(qualname)
            processor = factory(*args, **kwargs)
        except Exception as e:  # the named code's own failure: a 400 naming it
            raise InvalidRequestError(f"Logits processor {qualname!r} could not be constructed: "
                                      f"{type(e).__name__}: {e}", f"{_PARAM}.{i}") from None
        if not callable(processor):
            raise InvalidRequestError(f"Logits processor {qualname!r} did not give a callable.", f"{_PARAM}.{i}")
        out.append(processor)
    return out


def _arity(fn: Callable[..., Any]) -> int:
    try:
        return len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return 2


class RequestLogitsProcessorsAdapter(AdapterLogitsProcessor):
    """Applies each row's ``SamplingParams.logits_processors`` (rows without any untouched)."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> RequestLogitsProcessor | None:
        procs = list(params.logits_processors or ())
        if not procs:
            return None
        arities = [_arity(p) for p in procs]

        def run(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            for proc, n in zip(procs, arities):
                logits = proc(prompt_ids or [], output_ids, logits) if n == 3 else proc(output_ids, logits)
            return logits

        return run
