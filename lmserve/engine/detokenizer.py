"""Incremental detokenization and stop strings, per generated sequence (as vLLM's detokenizer).

Invariants of ``IncrementalDetokenizer``:
- Text is produced with vLLM's prefix/read-offset algorithm: after each token it decodes
  ``ids[prefix_offset:]`` and ``ids[prefix_offset:read_offset]`` and emits the difference only when
  it does not end in U+FFFD, so a character whose bytes span several tokens comes out whole.
  Decoding starts from the last few prompt tokens, so the first token's leading space is kept.
  Streaming a sequence token by token therefore yields exactly
  ``tokenizer.decode(output_ids, skip_special_tokens=...)`` for complete text (with
  ``spaces_between_special_tokens=True``; with a prompt, the first token's leading space is the
  context's, as vLLM). Bytes of a character still incomplete when generation ends are dropped (vLLM).
- ``spaces_between_special_tokens=True`` is what the tokenizer's decoder does (vLLM's fast path);
  ``False`` decodes the text between added tokens separately and glues added tokens on with no
  separator, so decoders that space tokens apart (WordPiece: "[CLS] hi [SEP]") do not do so
  around them ("[CLS]hi[SEP]").
- A stop token that ends the request (``stop_terminated``) is not detokenized unless
  ``include_stop_str_in_output``. It is still counted in ``token_ids``.
- Stop strings are searched only in text added since the last check (plus the overlap a stop
  string needs), and only once more than ``min_tokens`` tokens exist. The match that ends first
  wins (ties: the longer one), which is what checking after every single token would find, so the
  result does not depend on how tokens are batched into ``update`` calls. The text is cut before
  the stop string, or after it with ``include_stop_str_in_output``; nothing is added afterwards.
- ``get_next_output_text`` never returns a suffix that could still become part of a stop string
  while the request runs, and in delta mode never returns the same character twice: the
  concatenation of all deltas equals the final ``output_text``.
"""

from __future__ import annotations

from typing import Any, Callable

from lmserve.sampling_params import SamplingParams

# How many prompt tokens seed the decoder (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5
_REPLACEMENT_CHAR = "\ufffd"


def make_decode_fn(tokenizer: Any, skip_special_tokens: bool,
                   spaces_between_special_tokens: bool) -> Callable[[list[int]], str]:
    """A function ids -> text under the given flags (no clean-up of tokenization spaces).

    Fast tokenizers decode through the Rust backend; ids outside the vocabulary decode to "".
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # slow (Python) tokenizer: it implements both flags itself
        def decode_slow(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                    spaces_between_special_tokens=spaces_between_special_tokens,
                                    clean_up_tokenization_spaces=False)
        return decode_slow

    def decode_fast(ids: list[int]) -> str:
        return backend.decode(ids, skip_special_tokens=skip_special_tokens)

    if spaces_between_special_tokens:
        return decode_fast
    added = {i: (str(t.content if hasattr(t, "content") else t), bool(getattr(t, "special", False)))
             for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    if not added:
        return decode_fast

    def decode_glued(ids: list[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            tok = added.get(i)
            if tok is None:
                run.append(i)
            elif not (skip_special_tokens and tok[1]):  # a skipped special token does not split a run
                if run:
                    parts.append(backend.decode(run, skip_special_tokens=False))
                    run = []
                parts.append(tok[0])
        if run:
            parts.append(backend.decode(run, skip_special_tokens=False))
        return "".join(parts)

    return decode_glued


def detokenize_incrementally(decode: Callable[[list[int]], str], ids: list[int], prefix_offset: int,
                             read_offset: int) -> tuple[str, int, int]:
    """One step of vLLM's algorithm once ``ids`` has gained tokens past ``read_offset``.

    Returns ``(new_text, prefix_offset, read_offset)``: new text is
    ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``; when it is empty or ends in an
    incomplete character ("\\ufffd") nothing is emitted and the offsets stay, so the next token
    is decoded together with this one.
    """
    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text = decode(ids[prefix_offset:])
    if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
        return "", prefix_offset, read_offset
    return new_text[len(prefix_text):], read_offset, len(ids)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class IncrementalDetokenizer:
    """Detokenizes one sequence as its tokens arrive and applies stop strings.

    Built once per sequence with the request's params and prompt ids. ``tokenizer`` None or
    ``params.detokenize`` False gives a detokenizer that only counts tokens (text stays "").
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, prompt_token_ids: list[int]) -> None:
        self.token_ids: list[int] = []  # every output token passed to update(), stop tokens included
        self._text = ""
        self._stops: list[str] = list(params.stop or [])  # type: ignore[arg-type]
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._enabled = tokenizer is not None and params.detokenize
        self._stopped = False
        self._last_output_offset = 0  # chars of _text already returned in delta mode
        self._decode = (make_decode_fn(tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens)
                        if self._enabled else None)
        # Working window: the prompt's tail, then every output token that is detokenized.
        self._ids: list[int] = list(prompt_token_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    # ------------------------------------------------------------------ state
    @property
    def output_text(self) -> str:
        """All text so far (cut at a stop string, which is kept only with include_stop_str_in_output)."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def stopped(self) -> bool:
        """True once a stop string matched; later updates add no text."""
        return self._stopped

    # ------------------------------------------------------------------ update
    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        """Adds tokens (``stop_terminated``: the last one is the EOS / stop token id ending the
        request) and returns the stop string that matched in the new text, or None."""
        if not new_token_ids:
            return None
        ids, skipped = new_token_ids, None
        if stop_terminated and not self._include_stop:
            ids, skipped = new_token_ids[:-1], new_token_ids[-1]
        if self._stopped or not self._enabled:
            self.token_ids.extend(new_token_ids)
            return None
        check_from = len(self._text)
        for tid in ids:
            self.token_ids.append(tid)
            self._ids.append(tid)
            text, self._prefix_offset, self._read_offset = detokenize_incrementally(
                self._decode, self._ids, self._prefix_offset, self._read_offset)  # type: ignore[arg-type]
            self._text += text
            if self._min_tokens and len(self.token_ids) <= self._min_tokens:
                check_from = len(self._text)  # stop strings cannot end inside the first min_tokens
        if skipped is not None:
            self.token_ids.append(skipped)
        if not self._stops or len(self.token_ids) <= self._min_tokens:
            return None
        return self._apply_stop_strings(check_from)

    def _apply_stop_strings(self, check_from: int) -> str | None:
        """Finds the stop string ending first in text past ``check_from``; cuts the text there."""
        best: tuple[int, int, str] | None = None  # (end, -start, stop)
        for s in self._stops:
            start = self._text.find(s, max(0, check_from - len(s) + 1))
            if start != -1 and (best is None or (start + len(s), -start) < best[:2]):
                best = (start + len(s), -start, s)
        if best is None:
            return None
        end, neg_start, stop = best
        self._text = self._text[:end] if self._include_stop else self._text[:-neg_start]
        self._stopped = True
        return stop

    # ------------------------------------------------------------------ output
    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to report now: everything (``delta`` False) or what was not returned before
        (``delta`` True). While the request runs (not ``finished`` and no stop string matched),
        a trailing part that could be the beginning of a stop string is held back."""
        hold = 0
        if not (finished or self._stopped or self._include_stop) and self._stops:
            hold = _held_back(self._text, self._stops)
        end = len(self._text) - hold
        if not delta:
            return self._text[:end]
        start = self._last_output_offset
        if start >= end:
            return ""
        self._last_output_offset = end
        return self._text[start:end]


def decode_logprob_token(tokenizer: Any, token_id: int, return_as_token_id: bool) -> str:
    """A token as vLLM names it in logprobs: ``"token_id:{id}"`` when ``return_as_token_id``,
    else the token decoded alone with special tokens kept (a lone partial UTF-8 byte is "\\ufffd";
    an id outside the vocabulary is "")."""
    if return_as_token_id:
        return f"token_id:{token_id}"
    if tokenizer is None:
        return ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        if backend is not None:
            return backend.decode([token_id], skip_special_tokens=False)
        return tokenizer.decode([token_id]) or ""
    except (OverflowError, IndexError, KeyError, TypeError, ValueError):
        return ""
