"""Mirror of ``vllm.v1.sample.logits_processor.builtin``."""

from lmserve.worker.logits_processors.builtin import (  # noqa: F401
    LogitBiasLogitsProcessor,
    MinPLogitsProcessor,
    MinTokensLogitsProcessor,
)
from lmserve.worker.logits_processors.interface import process_dict_updates  # noqa: F401
