"""Mirror of ``vllm.v1.sample.logits_processor``: the same names, from lmserve."""

from lmserve.logits_processor import *  # noqa: F401,F403
from lmserve.logits_processor import __all__  # noqa: F401
