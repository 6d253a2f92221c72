"""Example logits processors written exactly as for vLLM v1, only the imports changed.

Importable by string, e.g. ``tests.logitsprocs_examples:DummyLogitsProcessor``.
"""

from __future__ import annotations

import torch

from lmserve.logits_processor import (
    AdapterLogitsProcessor,
    BatchUpdate,
    LogitsProcessor,
    RequestLogitsProcessor,
    VllmConfig,
    process_dict_updates,
)
from lmserve.sampling_params import SamplingParams


class DummyLogitsProcessor(LogitsProcessor):
    """Masks every token but ``extra_args["target_token"]`` for the rows that pass it."""

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        target_token = (params.extra_args or {}).get("target_token")
        if target_token is not None and not isinstance(target_token, int):
            raise ValueError(f"target_token value {target_token!r} is not int")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.req_info: dict[int, int] = {}

    def is_argmax_invariant(self) -> bool:
        """Changes the argmax: it forces a token."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(
            self.req_info, batch_update,
            lambda params, _, __: (params.extra_args or {}).get("target_token"))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.req_info:
            return logits
        cols = torch.tensor(list(self.req_info.values()), dtype=torch.long, device=logits.device)
        rows = torch.tensor(list(self.req_info.keys()), dtype=torch.long, device=logits.device)
        values_to_keep = logits[rows, cols].clone()
        logits[rows] = float("-inf")
        logits[rows, cols] = values_to_keep
        return logits


class DummyPerReqLogitsProcessor:
    """A per-request processor (vLLM's ``vllm.logits_process.LogitsProcessor`` callable)."""

    def __init__(self, target_token: int) -> None:
        self.target_token = target_token

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        val_to_keep = logits[self.target_token].item()
        logits[:] = float("-inf")
        logits[self.target_token] = val_to_keep
        return logits


class WrappedPerReqLogitsProcessor(AdapterLogitsProcessor):
    """vLLM's adapter example: the per-request processor above, for the whole batch."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> RequestLogitsProcessor | None:
        target_token = (params.extra_args or {}).get("target_token")
        if target_token is None or not isinstance(target_token, int):
            return None
        return DummyPerReqLogitsProcessor(target_token)


class NoRepeatPromptLogitsProcessor(AdapterLogitsProcessor):
    """A three-argument per-request processor: bans prompt tokens and already-generated
    ones when ``extra_args["no_repeat"]`` is true (it reads the live output list)."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> RequestLogitsProcessor | None:
        if not (params.extra_args or {}).get("no_repeat"):
            return None

        def ban_seen(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
            logits[seen.to(logits.device)] = float("-inf")
            return logits

        return ban_seen


class NotAProcessor:
    """Not a LogitsProcessor subclass: loading it must fail clearly."""


NOT_A_CLASS = 42


class ForceTokenProcessor:
    """A per-request processor (a request's ``logits_processors`` field, vLLM v0 style): only
    ``token_id`` may be sampled, from the ``after``-th output token on."""

    def __init__(self, token_id: int, after: int = 0) -> None:
        self.token_id = token_id
        self.after = after

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_token_ids) >= self.after:
            keep = logits[self.token_id].clone()
            logits.fill_(float("-inf"))
            logits[self.token_id] = keep
        return logits


def forbid_prompt_tokens(prompt_token_ids: list[int], output_token_ids: list[int], logits: torch.Tensor):
    """A three-argument per-request processor: bans every prompt token."""
    logits[list(set(prompt_token_ids))] = float("-inf")
    return logits


def make_forbid_prompt_tokens():
    return forbid_prompt_tokens


def force_token_closure(token_id: int):
    """A per-request processor factory that returns a local function: it cannot be pickled, so a
    data-parallel server (which sends params to its replica processes) must refuse it."""
    def force(output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        keep = logits[token_id].clone()
        logits.fill_(float("-inf"))
        logits[token_id] = keep
        return logits
    return force
