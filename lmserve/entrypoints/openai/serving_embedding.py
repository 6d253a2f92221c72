"""POST /v1/embeddings (OpenAI's Embeddings API; vLLM's extras: token-id inputs, ``messages``,
``truncate_prompt_tokens``, ``normalize``, ``add_special_tokens``, ``priority``).

``data[i]`` is the embedding of the i-th input, as floats or, with
``encoding_format="base64"``, as base64 of its little-endian float32 bytes. A ``messages``
request is one prompt (the rendered chat template), so it has one embedding.
"""

from __future__ import annotations

import time

from starlette.requests import Request

from lmserve.entrypoints.openai.protocol_pooling import (EmbeddingRequest, EmbeddingResponse,
                                                         EmbeddingResponseData)
from lmserve.entrypoints.openai.serving_pooling_base import (OpenAIServingPoolingBase, encode_tensor,
                                                             pooling_usage)
from lmserve.errors import LMServeError


class OpenAIServingEmbedding(OpenAIServingPoolingBase):
    async def create_embedding(self, request: EmbeddingRequest, request_id: str,
                               raw_request: Request | None) -> EmbeddingResponse | None:
        """The response, or None when the client went away first."""
        self.check_model(request.model)
        request.validate_request()
        params = self.verify_params(request.to_pooling_params("embed"), request)
        prompts = await self.prompts_for(request, "embedding generation")
        created = int(time.time())
        outs = await self.encode_all(prompts, params, request_id, request, raw_request)
        if outs is None:
            return None
        data = []
        for i, out in enumerate(outs):
            if out.outputs.data.dim() != 1:
                raise LMServeError("The model returned a non-vector embedding.")
            data.append(EmbeddingResponseData(index=i, embedding=encode_tensor(out.outputs.data,
                                                                               request.encoding_format)))
        return EmbeddingResponse(id=request_id, created=created, model=self.model_name, data=data,
                                 usage=pooling_usage(outs))
