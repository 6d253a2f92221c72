"""Structured outputs with a reasoning parser (issue 19, vLLM's rules): the grammar leaves the
reasoning free and constrains from the first token after its end marker; a prompt that already
closed the reasoning (a template with thinking off) constrains from the first token;
``enable_in_reasoning`` constrains from the first token regardless. Unit level on the real Qwen3
tokenizer (tests/data/qwen3), plus one engine run on a tiny random model with that tokenizer."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.reasoning import ReasoningParserManager
from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output.bitmask import unpack_bitmask
from lmserve.structured_output.config import StructuredOutputsConfig
from lmserve.structured_output.manager import StructuredOutputManager
from lmserve.worker.model_runner import ModelRunner

REGEX = r"[0-9]{3}-[a-c]{2}"
VOCAB = 151936  # Qwen3's embedding rows (the tokenizer has 151669 tokens)
USER = [{"role": "user", "content": "Give me a code."}]


def ids(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def prompt_ids(tok, enable_thinking: bool = True) -> list[int]:
    return ids(tok, tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True,
                                            enable_thinking=enable_thinking))


@pytest.fixture(scope="module")
def managers(qwen3):
    gated = StructuredOutputManager(StructuredOutputsConfig(), qwen3, VOCAB, stop_token_ids=[151645],
                                    reasoning_parser="qwen3")
    in_reasoning = StructuredOutputManager(StructuredOutputsConfig(enable_in_reasoning=True), qwen3, VOCAB,
                                           stop_token_ids=[151645], reasoning_parser="qwen3")
    yield gated, in_reasoning
    gated.shutdown()
    in_reasoning.shutdown()


def grammar_mask(requests: list) -> object:
    """The model runner's per-step mask for ``requests`` (objects with ``grammar`` and
    ``output_token_ids``), without a model."""
    runner = SimpleNamespace(_bitmask=None, vocab_size=VOCAB,
                             config=SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4)))
    return ModelRunner._grammar_mask(runner, requests)


def test_reasoning_is_free_and_the_grammar_starts_after_its_end(qwen3, managers):
    gated, _ = managers
    compiled = gated.compile(StructuredOutputsParams(regex=REGEX))
    state = gated.new_state(compiled, prompt_ids(qwen3))
    thinking = ids(qwen3, "<think>\nLet me think: letters, spaces & symbols!\n")
    out: list[int] = []
    for t in thinking:  # none of these is allowed by the regex: each passes because the reasoning is open
        out.append(t)
        assert state.sync(out) and state.in_reasoning and state.accepted == []
        assert grammar_mask([SimpleNamespace(grammar=state, output_token_ids=out)]) is None
    out.append(qwen3.convert_tokens_to_ids("</think>"))
    assert state.sync(out) and not state.in_reasoning and state.grammar_start == len(out)
    mask = grammar_mask([SimpleNamespace(grammar=None, output_token_ids=[]),
                         SimpleNamespace(grammar=state, output_token_ids=out)])
    assert mask is not None and mask.rows == [1]  # the first token after </think> is constrained
    allowed = {qwen3.decode([t]) for t in unpack_bitmask(mask.bitmask[1:2], VOCAB)[0].nonzero().flatten().tolist()}
    assert allowed and all(re.fullmatch(r"[0-9]+", s) for s in allowed), sorted(allowed)[:20]
    content = ids(qwen3, "123-ab")
    out += content
    assert state.sync(out) and state.accepted == content
    out.append(151645)
    assert state.sync(out) and state.is_terminated
    bad = gated.new_state(compiled, prompt_ids(qwen3))
    assert not bad.sync(thinking + [qwen3.convert_tokens_to_ids("</think>")] + ids(qwen3, "x")) and bad.failed


def test_prompt_that_ended_the_reasoning_constrains_from_the_first_token(qwen3, managers):
    gated, _ = managers
    compiled = gated.compile(StructuredOutputsParams(regex=REGEX))
    off = prompt_ids(qwen3, enable_thinking=False)  # the template closes an empty <think></think>
    assert qwen3.convert_tokens_to_ids("</think>") in off
    state = gated.new_state(compiled, off)
    assert not state.in_reasoning and state.grammar_start == 0
    assert not state.sync(ids(qwen3, "<think>")) and state.failed
    # thinking turned off by the request's chat_template_kwargs (vLLM's reasoning_parser_kwargs): no reasoning
    state = gated.new_state(compiled, prompt_ids(qwen3), {"chat_template_kwargs": {"enable_thinking": False}})
    assert not state.in_reasoning


def test_enable_in_reasoning_constrains_from_the_first_token(qwen3, managers):
    _, in_reasoning = managers
    assert in_reasoning.reasoner_cls is None
    state = in_reasoning.new_state(in_reasoning.compile(StructuredOutputsParams(regex=REGEX)), prompt_ids(qwen3))
    assert not state.in_reasoning
    mask = grammar_mask([SimpleNamespace(grammar=state, output_token_ids=[])])
    assert mask is not None and mask.rows == [0]
    assert not state.sync(ids(qwen3, "<think>\n")) and state.failed


def test_dropped_tokens_reopen_the_reasoning_and_replay(qwen3, managers):
    """Tokens dropped (rollback) or replayed in one go (a recomputed sequence): the state is a
    function of the token ids alone."""
    gated, _ = managers
    compiled = gated.compile(StructuredOutputsParams(regex=REGEX))
    think = ids(qwen3, "<think>\nhmm</think>")
    content = ids(qwen3, "123-ab")
    state = gated.new_state(compiled, prompt_ids(qwen3))
    assert state.sync(think + content)  # all at once: the end is found at its token
    assert state.grammar_start == len(think) and state.accepted == content
    assert state.sync(think + content[:1]) and state.accepted == content[:1]  # rollback after the end
    assert state.sync(think[:-1]) and state.in_reasoning and state.accepted == []  # the end itself dropped
    assert state.sync(think[:-1] + ids(qwen3, " more")) and state.in_reasoning
    assert state.sync(think + content) and state.grammar_start == len(think) and state.accepted == content
    fork = state.fork()
    assert fork.in_reasoning and fork.sync(think + content) and fork.accepted == content


def test_end_detection_is_incremental(qwen3, managers, monkeypatch):
    """Per appended token the parser sees only that token (no rescan of the output), and the
    whole-sequence check runs once, on the prompt."""
    gated, _ = managers
    parser_cls = ReasoningParserManager.get_reasoning_parser("qwen3")
    deltas: list[int] = []
    full_scans: list[int] = []
    real_streaming, real_full = parser_cls.is_reasoning_end_streaming, parser_cls.is_reasoning_end
    monkeypatch.setattr(parser_cls, "is_reasoning_end_streaming",
                        lambda self, i, d: (deltas.append(len(d)), real_streaming(self, i, d))[1])
    monkeypatch.setattr(parser_cls, "is_reasoning_end", lambda self, i: (full_scans.append(len(i)), real_full(self, i))[1])
    state = gated.new_state(gated.compile(StructuredOutputsParams(regex=REGEX)), prompt_ids(qwen3))
    out: list[int] = []
    for t in ids(qwen3, "<think>\n" + "word " * 40 + "</think>"):
        out.append(t)
        state.sync(out)
        state.sync(out)  # the model runner's sync of the same tokens: nothing to look at
    assert not state.in_reasoning and deltas == [1] * len(out) and len(full_scans) == 1


def test_multi_token_markers_are_found_across_steps(qwen3):
    """``[/THINK]`` is several Qwen3 tokens: the streaming check finds it when its last token lands."""
    parser = ReasoningParserManager.get_reasoning_parser("mistral")(qwen3)
    end = ids(qwen3, "[/THINK]")
    assert len(end) > 1
    seq = ids(qwen3, "[THINK]abc") + end + ids(qwen3, "x")
    found = [k for k in range(1, len(seq) + 1) if parser.is_reasoning_end_streaming(seq[:k], seq[k - 1:k])]
    assert found == [len(seq) - 1]
    assert parser.is_reasoning_end_streaming(seq, seq[-4:]) and not parser.is_reasoning_end_streaming(seq, seq[-1:])


class ScriptThenFree:
    """A per-request logits processor: output token i is forced to ``script[i]`` (the rest of the
    vocabulary -inf, whatever a grammar mask allowed), then it leaves the logits alone."""

    def __init__(self, script: list[int]) -> None:
        self.script = script

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        k = len(output_token_ids)
        if k < len(self.script):
            logits.fill_(float("-inf"))
            logits[self.script[k]] = 0.0
        return logits


def test_engine_reasoning_then_grammar_with_preemption(qwen3, tmp_path):
    """One engine with --reasoning-parser qwen3 (``LLM(reasoning_parser=...)``) on a tiny random
    model: the scripted thinking (text the regex forbids) passes through, then the random model is
    held to the regex; a thinking-off prompt is held from its first token. The KV cache is small
    enough for preemption and recompute."""
    from tests.conftest import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path / "qwen"), "qwen2", vocab_size=VOCAB, bos_token_id=151643,
                                eos_token_id=151645)
    qwen3.save_pretrained(path)
    llm = LLM(path, dtype="float32", block_size=4, num_gpu_blocks_override=36, max_model_len=128,
              max_num_batched_tokens=16, reasoning_parser="qwen3")
    script = ids(qwen3, "<think>\nFirst, some thoughts: no digits here!\n</think>")
    long_regex = r"[0-9]{20}-[a-c]{8}"
    so = StructuredOutputsParams(regex=long_regex)
    thinking = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=80, structured_outputs=so,
                              logits_processors=[ScriptThenFree(script)])
    plain = SamplingParams(n=2, temperature=1.0, seed=6, max_tokens=40, structured_outputs=so)
    outs = llm.generate([{"prompt_token_ids": prompt_ids(qwen3)}, {"prompt_token_ids": prompt_ids(qwen3, False)}],
                        [thinking, plain])
    assert llm.llm_engine.get_stats()["num_preemptions"] > 0
    for o in outs[0].outputs:
        assert o.token_ids[:len(script)] == script, o.text
        assert re.fullmatch(long_regex, qwen3.decode(o.token_ids[len(script):], skip_special_tokens=True)), o.text
        assert o.finish_reason == "stop"
    for o in outs[1].outputs:
        assert re.fullmatch(long_regex, o.text), o.text


def test_engine_args_reasoning_parser_is_checked():
    from lmserve.engine.arg_utils import EngineArgs

    assert EngineArgs(model="x", reasoning_parser="qwen3")._reasoning_parser() == "qwen3"
    assert EngineArgs(model="x")._reasoning_parser() is None
    with pytest.raises(ValueError, match="invalid reasoning parser: nope"):
        EngineArgs(model="x", reasoning_parser="nope")._reasoning_parser()
