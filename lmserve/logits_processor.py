"""Public home of the logits-processor API, for processors written for vLLM v1.

A vLLM processor ports by changing only its imports::

    from vllm.config import VllmConfig                     ->  from lmserve.logits_processor import VllmConfig
    from vllm.v1.sample.logits_processor import (...)      ->  from lmserve.logits_processor import (...)
    (or keep the vLLM module layout: ``lmserve.v1.sample.logits_processor``)
"""

from lmserve.config import EngineConfig
from lmserve.config import EngineConfig as VllmConfig
from lmserve.sampling_params import SamplingParams
from lmserve.worker.logits_processors import (
    BUILTIN_LOGITS_PROCESSORS,
    LOGITSPROCS_GROUP,
    VLLM_LOGITSPROCS_GROUP,
    AdapterLogitsProcessor,
    AddedRequest,
    BatchUpdate,
    BatchUpdateBuilder,
    LogitBiasLogitsProcessor,
    LogitsProcessor,
    LogitsProcessors,
    MinPLogitsProcessor,
    MinTokensLogitsProcessor,
    MovedRequest,
    MoveDirectionality,
    RemovedRequest,
    RequestLogitsProcessor,
    build_logitsprocs,
    load_custom_logitsprocs,
    process_dict_updates,
    validate_all,
)

__all__ = [
    "AdapterLogitsProcessor", "AddedRequest", "BatchUpdate", "BatchUpdateBuilder",
    "BUILTIN_LOGITS_PROCESSORS", "EngineConfig", "LOGITSPROCS_GROUP", "LogitBiasLogitsProcessor",
    "LogitsProcessor", "LogitsProcessors", "MinPLogitsProcessor", "MinTokensLogitsProcessor",
    "MovedRequest", "MoveDirectionality", "RemovedRequest", "RequestLogitsProcessor", "SamplingParams",
    "VLLM_LOGITSPROCS_GROUP", "VllmConfig", "build_logitsprocs", "load_custom_logitsprocs",
    "process_dict_updates", "validate_all",
]
