"""Mirror of ``vllm.v1.sample.logits_processor.state``."""

from lmserve.worker.logits_processors.interface import BatchUpdateBuilder, LogitsProcessors  # noqa: F401
