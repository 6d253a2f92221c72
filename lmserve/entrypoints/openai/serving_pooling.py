"""POST /pooling (vLLM's Pooling API): the raw pooler output of each input.

The input shapes are those of the Embeddings API. ``task`` picks the pooling task; left out
(or "encode"), it is the model's per-token task (``token_embed`` for embedding models,
``token_classify`` for classifiers), so ``data`` is a list of per-token vectors; for
``embed``/``classify``/``score`` it is one vector.
"""

from __future__ import annotations

import time

from starlette.requests import Request

from lmserve.entrypoints.openai.protocol_pooling import PoolingRequest, PoolingResponse, PoolingResponseData
from lmserve.entrypoints.openai.serving_pooling_base import (OpenAIServingPoolingBase, encode_tensor,
                                                             pooling_usage)


class OpenAIServingPooling(OpenAIServingPoolingBase):
    async def create_pooling(self, request: PoolingRequest, request_id: str,
                             raw_request: Request | None) -> PoolingResponse | None:
        """The response, or None when the client went away first."""
        self.check_model(request.model)
        request.validate_request()
        params = self.verify_params(request.to_pooling_params(request.task), request)
        prompts = await self.prompts_for(request, "pooling")
        created = int(time.time())
        outs = await self.encode_all(prompts, params, request_id, request, raw_request)
        if outs is None:
            return None
        data = [PoolingResponseData(index=i, data=encode_tensor(out.outputs.data, request.encoding_format))
                for i, out in enumerate(outs)]
        return PoolingResponse(id=request_id, created=created, model=self.model_name, data=data,
                               usage=pooling_usage(outs))
