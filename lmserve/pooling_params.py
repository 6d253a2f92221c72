"""Parameters of one pooling request (embed, classify, score, per-token outputs), field for
field as vLLM's ``PoolingParams``.

Invariants after construction:
- ``task`` is None (the caller's API fills it in) or one of ``POOLING_TASKS``;
- ``dimensions`` and ``truncate_prompt_tokens`` are None or positive (truncate may be -1,
  meaning "truncate to the model's maximum length");
- ``activation`` and ``softmax`` are accepted as older aliases of ``use_activation``.
``verify(task, model_config)`` fills the defaults of the model's pooler config and raises
``ValueError`` (an HTTP 400) for what the model cannot do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from lmserve.sampling_params import RequestOutputKind

# "encode" is vLLM's older name for the per-token task; it is resolved to token_embed or
# token_classify by ``resolve_encode_task``.
POOLING_TASKS = ("embed", "classify", "score", "token_embed", "token_classify")

# Which PoolingParams fields each task reads (others must stay None).
_TASK_FIELDS = {
    "embed": {"dimensions", "normalize"},
    "token_embed": {"dimensions", "normalize"},
    "classify": {"use_activation"},
    "score": {"use_activation"},
    "token_classify": {"use_activation"},
}


@dataclass
class PoolingParams:
    truncate_prompt_tokens: int | None = None
    dimensions: int | None = None  # matryoshka: keep the first N dims (then re-normalize)
    normalize: bool | None = None  # None: the model's pooler config decides
    use_activation: bool | None = None  # softmax/sigmoid on classification logits; None: yes
    task: str | None = None
    requires_token_ids: bool = False
    extra_kwargs: dict[str, Any] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY
    # Deprecated aliases of use_activation (vLLM accepted both).
    activation: bool | None = None
    softmax: bool | None = None
    # Filled by ``verify`` from the model's PoolerConfig when None here.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for alias in ("activation", "softmax"):
            value = getattr(self, alias)
            if value is not None:
                if self.use_activation is None:
                    self.use_activation = bool(value)
                setattr(self, alias, None)
        if self.task is not None and self.task != "encode" and self.task not in POOLING_TASKS:
            raise ValueError(f"Unknown pooling task {self.task!r}; choose from {', '.join(POOLING_TASKS)}")
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (not isinstance(t, int) or (t < 1 and t != -1)):
            raise ValueError(f"truncate_prompt_tokens must be a positive integer or -1, got {t!r}")

    def clone(self) -> "PoolingParams":
        return copy.deepcopy(self)

    def verify(self, task: str, model_config: Any) -> None:
        """Sets ``task`` and fills unset fields from ``model_config.pooler_config``.

        Raises ValueError when the model does not support ``task``, when a field does not apply
        to the task, or when ``dimensions`` is asked of a model without matryoshka support.
        """
        supported = tuple(getattr(model_config, "supported_pooling_tasks", ()) or ())
        if task not in supported:
            raise ValueError(f"The model does not support the {task!r} pooling task "
                             f"(it supports: {', '.join(supported) or 'none'}).")
        if self.task is not None and self.task != task and self.task != "encode":
            raise ValueError(f"These pooling params are for task {self.task!r}, not {task!r}")
        self.task = task
        allowed = _TASK_FIELDS[task]
        for name in ("dimensions", "normalize", "use_activation"):
            if getattr(self, name) is not None and name not in allowed:
                raise ValueError(f"{name} does not apply to the {task!r} task")
        pooler = getattr(model_config, "pooler_config", None)
        if self.normalize is None and "normalize" in allowed:
            norm = getattr(pooler, "normalize", None)
            self.normalize = True if norm is None else bool(norm)
        if self.use_activation is None and "use_activation" in allowed:
            act = getattr(pooler, "use_activation", None)
            self.use_activation = True if act is None else bool(act)
        if self.dimensions is None and pooler is not None and "dimensions" in allowed:
            self.dimensions = getattr(pooler, "dimensions", None)
        if self.dimensions is not None:
            hf = getattr(model_config, "hf_config", None)
            matryoshka = getattr(hf, "is_matryoshka", False) or getattr(hf, "matryoshka_dimensions", None)
            if not matryoshka:
                raise ValueError("Model does not support matryoshka representation, changing output "
                                 "dimensions will lead to poor results.")
            allowed_dims = getattr(hf, "matryoshka_dimensions", None)
            if allowed_dims and self.dimensions not in allowed_dims:
                raise ValueError(f"Model only supports {list(allowed_dims)} matryoshka dimensions, "
                                 f"use other output dimensions will lead to poor results.")
            hidden = int(getattr(hf, "hidden_size", self.dimensions))
            if self.dimensions > hidden:
                raise ValueError(f"dimensions must be at most the hidden size ({hidden}), "
                                 f"got {self.dimensions}")


def resolve_encode_task(task: str | None, supported: tuple[str, ...]) -> str:
    """The task of an ``encode``/``/pooling`` call: explicit, or the model's per-token task
    (``token_embed`` for embedding models, ``token_classify`` for classifiers), else its first."""
    if task is not None and task != "encode":
        return task
    for candidate in ("token_embed", "token_classify"):
        if candidate in supported:
            return candidate
    if not supported:
        raise ValueError("The model supports no pooling task")
    return supported[0]
