"""Request models of the OpenAI-compatible API: the OpenAI fields plus vLLM's extra ones
(spec: seeds 001 and 002), and their translation into ``SamplingParams``.

Invariants:
- type and range errors are pydantic errors (the app turns them into 400 with ``param``);
  cross-field rules and "not supported yet" are ``InvalidRequestError`` raised by
  ``validate_request()``, also 400 with ``param``;
- unknown fields are accepted and ignored (as vLLM) and listed by ``ignored_fields()``;
- no string anywhere in a request holds a lone surrogate (JSON allows ``"\\ud800"``, Unicode
  does not: tokenizers, logs and responses cannot take it), and no number is NaN or infinite:
  both are 400s naming the field;
- a ``request_id`` has no control or format characters (it reaches logs and response ids);
- ``to_sampling_params`` never mutates the request and always sets ``output_kind=DELTA``:
  every response, streaming or not, is built from deltas.
Response models live in ``protocol_responses``.

This module only re-exports the request models, which live in:
- ``protocol_common``: ``OpenAIBaseModel``, ``ChatMessageParam``, request-id and surrogate
  checks, shared bounds and schemas;
- ``protocol_sampling``: ``SamplingRequest`` (the fields shared by completions and chat) and
  its parts (``ResponseFormat``, ``StreamOptions``, ...);
- ``protocol_completions``: ``CompletionRequest`` and ``ChatCompletionRequest``;
- ``protocol_tokenization``: the /tokenize and /detokenize requests.
The pooling APIs' models are in ``protocol_pooling``.
"""

from lmserve.entrypoints.openai.protocol_common import (INT64_MAX, INT64_MIN, PROMPT_SCHEMA, ChatMessageParam,
                                                        OpenAIBaseModel, check_request_id, find_lone_surrogate, now,
                                                        random_uuid)
from lmserve.entrypoints.openai.protocol_completions import (REASONING_EFFORTS, ChatCompletionRequest,
                                                             CompletionRequest)
from lmserve.entrypoints.openai.protocol_sampling import (LEGACY_GUIDED_FIELDS, MAX_N, MAX_STOP_CHARS,
                                                          JsonSchemaResponseFormat, LogitsProcessorConstructor,
                                                          RepetitionDetection, ResponseFormat, SamplingRequest,
                                                          StreamOptions)
from lmserve.entrypoints.openai.protocol_tokenization import (DetokenizeRequest, TokenizeChatRequest,
                                                              TokenizeCompletionRequest)

__all__ = (
    "INT64_MAX", "INT64_MIN", "LEGACY_GUIDED_FIELDS", "MAX_N", "MAX_STOP_CHARS", "PROMPT_SCHEMA", "REASONING_EFFORTS",
    "ChatCompletionRequest", "ChatMessageParam", "CompletionRequest", "DetokenizeRequest", "JsonSchemaResponseFormat",
    "LogitsProcessorConstructor", "OpenAIBaseModel", "RepetitionDetection", "ResponseFormat", "SamplingRequest",
    "StreamOptions", "TokenizeChatRequest", "TokenizeCompletionRequest", "check_request_id", "find_lone_surrogate",
    "now", "random_uuid",
)
