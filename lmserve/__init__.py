"""lmserve: an LLM inference engine with an OpenAI-compatible server (wire-compatible with `vllm serve`)."""

from lmserve.sampling_params import (BeamSearchParams, RequestOutputKind, SamplingParams,
                                     StructuredOutputsParams)
from lmserve.outputs import CompletionOutput, Logprob, RequestOutput

__version__ = "0.1.0"

__all__ = ["LLM", "AsyncLLM", "EngineArgs", "SamplingParams", "BeamSearchParams", "RequestOutputKind",
           "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):
    # Heavy imports (torch models, transformers) only when asked for.
    if name == "LLM":
        from lmserve.entrypoints.llm import LLM
        return LLM
    if name == "AsyncLLM":
        from lmserve.engine.async_engine import AsyncLLM
        return AsyncLLM
    if name == "EngineArgs":
        from lmserve.engine.arg_utils import EngineArgs
        return EngineArgs
    raise AttributeError(name)
