"""Scoring pairs of texts, shared by ``LLM.score``, ``/score`` and ``/rerank``.

Two ways to score, picked from the model (``score_mode``):
- ``"cross_encoder"``: the model supports the ``score`` task; each pair is one prompt,
  tokenized as a pair (``tokenizer(text_1, text_2)``) so the segments carry their
  ``token_type_ids``; the engine returns one number per pair.
- ``"embedding"``: the model supports ``embed``; every distinct text is embedded once and a
  pair's score is the cosine similarity of its two embeddings (as vLLM).

Invariants:
- ``validate_score_input`` accepts exactly vLLM's shapes, 1-1, 1-N and N-N, and returns two
  lists of equal length (a single ``text_1`` is repeated for the 1-N case);
- every problem with the input is a ``ValueError`` (a 400 in the server);
- ``cross_encoder_prompt`` never returns more than ``max_length`` ids when truncating, and
  its ``token_type_ids`` always has one entry per id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from lmserve.outputs import PoolingOutput, PoolingRequestOutput

ScoreMode = str  # "cross_encoder" | "embedding"


def score_mode(model_config: Any, api: str = "Score API") -> ScoreMode:
    """How ``model_config``'s model scores pairs; ValueError when it cannot."""
    tasks = tuple(getattr(model_config, "supported_pooling_tasks", ()) or ())
    if getattr(model_config, "runner_type", "generate") != "pooling":
        raise ValueError(f"The model does not support {api}: it is a generative model (score and rerank "
                         "need a cross-encoder or an embedding model, served with --runner pooling).")
    if "score" in tasks:
        num_labels = getattr(getattr(model_config, "hf_config", None), "num_labels", 1)
        if num_labels == 1:
            return "cross_encoder"
        if "embed" not in tasks:
            raise ValueError(f"The model does not support {api}: Score API is only enabled for "
                             f"num_labels == 1 (this classifier has {num_labels} labels).")
    if "embed" in tasks:
        return "embedding"
    raise ValueError(f"The model does not support {api}: it supports the pooling tasks "
                     f"{', '.join(tasks) or 'none'}, and scoring needs 'score' (a cross-encoder with "
                     "one label) or 'embed'.")


def validate_score_input(data_1: Any, data_2: Any) -> tuple[list[Any], list[Any]]:
    """Normalises the two sides to lists and checks the 1-1 / 1-N / N-N shapes.

    A single item (a string or a prompt dict) becomes a one-element list. Returns
    ``(items_1, items_2)`` of equal length: for 1-N, ``items_1`` is the one item N times."""
    items_1 = [data_1] if isinstance(data_1, (str, dict)) else list(data_1)
    items_2 = [data_2] if isinstance(data_2, (str, dict)) else list(data_2)
    if len(items_1) == 0:
        raise ValueError("At least one text element must be given")
    if len(items_2) == 0:
        raise ValueError("At least one text_pair element must be given")
    if len(items_1) > 1 and len(items_1) != len(items_2):
        raise ValueError("Input lengths must be either 1:1, 1:N or N:N")
    if len(items_1) == 1:
        items_1 = items_1 * len(items_2)
    return items_1, items_2


def ensure_text(item: Any, tokenizer: Any = None) -> str:
    """A scoring input as text: a string, ``{"prompt": text}``, or ``{"prompt_token_ids": ids}``
    (decoded, as vLLM)."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "multi_modal_data" in item:
            raise ValueError("Multi-modal prompts are not supported in scoring")
        if item.get("prompt") is not None:
            return str(item["prompt"])
        if item.get("prompt_token_ids") is not None:
            if tokenizer is None:
                raise ValueError("Scoring token ids needs a tokenizer to decode them")
            return tokenizer.decode(list(item["prompt_token_ids"]))
    raise ValueError(f"A scoring input must be a string or a prompt dict, got {type(item).__name__}")


def truncation_length(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """The token count to truncate to (None: no truncation); -1 means max_model_len.
    A value above max_model_len is vLLM's ValueError."""
    if truncate_prompt_tokens is None:
        return None
    if truncate_prompt_tokens == -1:
        return max_model_len
    if truncate_prompt_tokens < 1:
        raise ValueError("truncate_prompt_tokens must be -1 or at least 1.")
    if truncate_prompt_tokens > max_model_len:
        raise ValueError(f"truncate_prompt_tokens value ({truncate_prompt_tokens}) is greater than "
                         f"max_model_len ({max_model_len}). Please, select a smaller truncation size.")
    return truncate_prompt_tokens


def cross_encoder_prompt(tokenizer: Any, text_1: str, text_2: str,
                         max_length: int | None = None) -> dict[str, Any]:
    """One cross-encoder prompt: the pair tokenized together (``[CLS] a [SEP] b [SEP]`` for
    BERT), with ``token_type_ids`` when the tokenizer makes them. ``max_length`` truncates
    the longer side first (the tokenizer's ``longest_first``), keeping the special tokens."""
    kwargs: dict[str, Any] = {"truncation": True, "max_length": max_length} if max_length else {}
    enc = tokenizer(text=text_1, text_pair=text_2, **kwargs)
    prompt: dict[str, Any] = {"prompt_token_ids": list(enc["input_ids"]), "prompt": f"{text_1}\n{text_2}"}
    tt = enc.get("token_type_ids") if hasattr(enc, "get") else None
    if tt is not None:
        prompt["token_type_ids"] = list(tt)
    return prompt


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two 1-D vectors, in float32 (0 when either is all zeros)."""
    a32, b32 = a.reshape(-1).float(), b.reshape(-1).float()
    return float(torch.nn.functional.cosine_similarity(a32, b32, dim=0, eps=1e-8))


def embedding_pair_scores(embeds_1: Sequence[PoolingRequestOutput], embeds_2: Sequence[PoolingRequestOutput],
                          pad_token_id: int | None) -> list[PoolingRequestOutput]:
    """vLLM's ``_cosine_similarity``: one PoolingRequestOutput per pair whose data is the
    score (a [1] tensor); its ``prompt_token_ids`` are both prompts joined by the pad token
    (what the pair costs, for usage); its request id is ``"<id_1>_<id_2>"``."""
    if len(embeds_1) != len(embeds_2):
        raise ValueError("embedding pairs must come in two lists of equal length")
    pad = [pad_token_id] if pad_token_id is not None else []
    out = []
    for e1, e2 in zip(embeds_1, embeds_2):
        score = cosine_similarity(e1.outputs.data, e2.outputs.data)
        out.append(PoolingRequestOutput(f"{e1.request_id}_{e2.request_id}",
                                        PoolingOutput(torch.tensor([score], dtype=torch.float32)),
                                        list(e1.prompt_token_ids) + pad + list(e2.prompt_token_ids),
                                        finished=True))
    return out


def dedup_inputs(items_1: list[Any], items_2: list[Any]) -> tuple[list[Any], list[int], list[int]]:
    """Distinct inputs to embed (strings or prompt dicts), and for each pair the positions of
    its two sides among them: a 1-N request (the same query N times) embeds the query once."""
    order: dict[str, int] = {}
    unique: list[Any] = []
    for item in (*items_1, *items_2):
        key = item if isinstance(item, str) else json.dumps(item, sort_keys=True, default=str)
        if key not in order:
            order[key] = len(unique)
            unique.append(item)

    def pos(item: Any) -> int:
        return order[item if isinstance(item, str) else json.dumps(item, sort_keys=True, default=str)]

    return unique, [pos(x) for x in items_1], [pos(x) for x in items_2]
