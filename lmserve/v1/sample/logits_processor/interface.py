"""Mirror of ``vllm.v1.sample.logits_processor.interface``."""

from lmserve.worker.logits_processors.interface import (  # noqa: F401
    AddedRequest,
    BatchUpdate,
    LogitsProcessor,
    MovedRequest,
    MoveDirectionality,
    RemovedRequest,
)
