"""``--enable-log-outputs`` (with ``--enable-log-requests``): each request's generated text, token
ids and finish reason at INFO, as vLLM's request logger writes them; with ``--enable-log-deltas``
(the default) a streamed request also logs each delta as it goes. Every user-influenced part is a
repr cut to --max-log-len characters (no raw newlines reach the log)."""

from __future__ import annotations

import logging

from lmserve.outputs import RequestOutput
from lmserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("lmserve.entrypoints.openai.serving_engine")


def clip(text: str, n: int | None) -> str:
    """``text`` cut to ``n`` characters (None: whole), saying how much was cut."""
    if n is None or len(text) <= n:
        return text
    return f"{text[:n]}...[{len(text) - n} more characters]"


class OutputLogger:
    """Follows one request's outputs (``observe`` each one, in order). ``params.output_kind`` says
    whether outputs are deltas (a streamed request) or cumulative/final."""

    def __init__(self, request_id: str, params: SamplingParams, max_log_len: int | None, log_deltas: bool) -> None:
        self.rid = clip(repr(request_id), max_log_len)
        self.streaming = params.output_kind == RequestOutputKind.DELTA
        self.max_log_len = max_log_len
        self.log_deltas = log_deltas
        self.text: dict[int, str] = {}
        self.token_ids: dict[int, list[int]] = {}

    def _line(self, what: str, index: int, text: str, ids: list[int], finish: str | None) -> None:
        n = self.max_log_len
        logger.info("Generated response %s%s: index: %d, output: %s, output_token_ids: %s, finish_reason: %s",
                    self.rid, what, index, clip(repr(text), n), clip(str(ids if n is None else ids[:n]), n), finish)

    def observe(self, out: RequestOutput) -> None:
        for o in out.outputs:
            if self.streaming:
                self.text[o.index] = self.text.get(o.index, "") + o.text
                self.token_ids.setdefault(o.index, []).extend(o.token_ids)
                if self.log_deltas and (o.text or o.token_ids):
                    self._line(" (streaming delta)", o.index, o.text, list(o.token_ids), o.finish_reason)
            else:
                self.text[o.index], self.token_ids[o.index] = o.text, list(o.token_ids)
            if o.finish_reason is not None:
                self._line(" (streaming complete)" if self.streaming else "", o.index, self.text[o.index],
                           self.token_ids[o.index], o.finish_reason)
