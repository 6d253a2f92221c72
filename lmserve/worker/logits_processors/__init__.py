"""Logits processors: the vLLM v1 interface, the built-ins, and custom loading."""

from lmserve.worker.logits_processors.builtin import (
    BUILTIN_LOGITS_PROCESSORS,
    LogitBiasLogitsProcessor,
    MinPLogitsProcessor,
    MinTokensLogitsProcessor,
)
from lmserve.worker.logits_processors.interface import (
    AdapterLogitsProcessor,
    AddedRequest,
    BatchUpdate,
    BatchUpdateBuilder,
    LogitsProcessor,
    LogitsProcessors,
    MovedRequest,
    MoveDirectionality,
    RemovedRequest,
    RequestLogitsProcessor,
    process_dict_updates,
)
from lmserve.worker.logits_processors.loading import (
    LOGITSPROCS_GROUP,
    VLLM_LOGITSPROCS_GROUP,
    build_logitsprocs,
    load_custom_logitsprocs,
    load_plugin_logitsprocs,
    validate_all,
)

__all__ = [
    "AdapterLogitsProcessor", "AddedRequest", "BatchUpdate", "BatchUpdateBuilder",
    "BUILTIN_LOGITS_PROCESSORS", "LogitBiasLogitsProcessor", "LogitsProcessor", "LogitsProcessors",
    "LOGITSPROCS_GROUP", "MinPLogitsProcessor", "MinTokensLogitsProcessor", "MovedRequest",
    "MoveDirectionality", "RemovedRequest", "RequestLogitsProcessor", "VLLM_LOGITSPROCS_GROUP",
    "build_logitsprocs", "load_custom_logitsprocs", "load_plugin_logitsprocs", "process_dict_updates",
    "validate_all",
]
