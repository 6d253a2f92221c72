"""GET /v1/models and /v1/models/{name}: the served model names (``--served-model-name``,
several allowed; the first is the one responses report), then the LoRA adapters (as vLLM: ``root``
their path, ``parent`` their base model)."""

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

    def _lora_cards(self) -> list[ModelCard]:
        loras = self.options.loras.all() if self.options.loras is not None else []
        return [ModelCard(id=lr.lora_name, root=lr.lora_path, parent=lr.base_model_name or self.options.served_model_names[0],
                          permission=[ModelPermission()]) for lr in loras]

    def list_models(self) -> ModelList:
        return ModelList(data=[self._card(n) for n in self.options.served_model_names] + self._lora_cards())

    def get_model(self, name: str) -> ModelCard:
        if name in self.options.served_model_names:
            return self._card(name)
        for card in self._lora_cards():
            if card.id == name:
                return card
        raise NotFoundError(f"The model `{name}` does not exist.", "model")
