"""GET /v1/models and /v1/models/{name}: the served model names (``--served-model-name``,
several allowed; the first is the one responses report)."""

from __future__ import annotations

from lmserve.entrypoints.openai.protocol_responses import ModelCard, ModelList, ModelPermission
from lmserve.entrypoints.openai.serving_engine import ServerOptions
from lmserve.errors import NotFoundError


class OpenAIServingModels:
    def __init__(self, options: ServerOptions, max_model_len: int) -> None:
        self.options = options
        self.max_model_len = max_model_len

    def _card(self, name: str) -> ModelCard:
        return ModelCard(id=name, root=self.options.model_root or name, max_model_len=self.max_model_len,
                         permission=[ModelPermission()])

    def list_models(self) -> ModelList:
        return ModelList(data=[self._card(n) for n in self.options.served_model_names])

    def get_model(self, name: str) -> ModelCard:
        if name not in self.options.served_model_names:
            raise NotFoundError(f"The model `{name}` does not exist.", "model")
        return self._card(name)
