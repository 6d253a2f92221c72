"""POST /classify (vLLM's Classification API): class probabilities of each input.

``data[i].probs`` has one entry per label (softmax, or sigmoid for a one-label model; the
raw logits with ``use_activation: false``); ``label`` is the name of the largest one from the
model's ``id2label`` (None when the config has no names).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request

from lmserve.entrypoints.openai.protocol_pooling import (ClassificationData, ClassificationRequest,
                                                         ClassificationResponse)
from lmserve.entrypoints.openai.serving_pooling_base import OpenAIServingPoolingBase, pooling_usage
from lmserve.outputs import ClassificationOutput


def label_of(id2label: dict[Any, str] | None, index: int) -> str | None:
    if not id2label:
        return None
    return id2label.get(index, id2label.get(str(index)))


class OpenAIServingClassification(OpenAIServingPoolingBase):
    async def create_classify(self, request: ClassificationRequest, request_id: str,
                              raw_request: Request | None) -> ClassificationResponse | None:
        """The response, or None when the client went away first."""
        self.check_model(request.model)
        request.validate_request()
        params = self.verify_params(request.to_pooling_params("classify"), request)
        prompts = await self.prompts_for(request, "classification")
        created = int(time.time())
        outs = await self.encode_all(prompts, params, request_id, request, raw_request)
        if outs is None:
            return None
        id2label = getattr(self.model_config.hf_config, "id2label", None)
        data = []
        for i, out in enumerate(outs):
            probs = ClassificationOutput.from_base(out.outputs).probs
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append(ClassificationData(index=i, label=label_of(id2label, best), probs=probs,
                                           num_classes=len(probs)))
        return ClassificationResponse(id=request_id, created=created, model=self.model_name, data=data,
                                      usage=pooling_usage(outs))
