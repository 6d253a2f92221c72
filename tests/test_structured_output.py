"""Structured outputs (xgrammar) through the whole engine (``LLM``), on a tiny random Llama with
SmolLM2's real tokenizer, sampled at temperature 1: a random model obeys a grammar only if the
mask works, so each test fails if the constraint were ignored or applied to the wrong row."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.errors import InvalidRequestError
from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output import json_schema_constraint
from lmserve.structured_output.bitmask import GrammarBitmask, apply_bitmask_torch, unpack_bitmask
from lmserve.structured_output.config import StructuredOutputsConfig
from lmserve.structured_output.manager import COMPILE_THREAD_PREFIX

SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["kind", "ok", "tags"], "additionalProperties": False}
CHOICES = ["yes", "no", "maybe"]
REGEX = r"[0-9]{3}-[a-c]{2}"


@pytest.fixture(scope="module")
def llm(tiny_text_model):
    return LLM(tiny_text_model, dtype="float32", block_size=4, kv_cache_memory=16 * 2**20, max_model_len=256)


def sample(llm, so, n=4, prompt="Hello there", max_tokens=48, **kw):
    params = SamplingParams(n=n, temperature=1.0, seed=kw.pop("seed", 0), max_tokens=max_tokens,
                            structured_outputs=so, **kw)
    return llm.generate([prompt], params)[0].outputs


def test_choice_regex_json_obey_with_n(llm):
    outs = sample(llm, StructuredOutputsParams(choice=CHOICES), n=6)
    assert all(o.text in CHOICES and o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    outs = sample(llm, StructuredOutputsParams(regex=REGEX), n=6)
    assert all(re.fullmatch(REGEX, o.text) for o in outs), [o.text for o in outs]
    outs = sample(llm, json_schema_constraint(SCHEMA, disable_any_whitespace=True), n=6, max_tokens=60)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
        assert " " not in o.text


def test_unconstrained_rows_are_not_masked(llm):
    """A constrained and an unconstrained request in one batch: only the constrained row obeys."""
    params = [SamplingParams(temperature=1.0, seed=1, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=1, max_tokens=12, structured_outputs=StructuredOutputsParams(
                  regex=REGEX))]
    free, constrained = llm.generate(["Hello there", "Hello there"], params)
    assert re.fullmatch(REGEX, constrained.outputs[0].text)
    assert len(free.outputs[0].token_ids) == 12 and not re.fullmatch(REGEX, free.outputs[0].text)


def test_json_object_and_grammar_forms(llm):
    outs = sample(llm, StructuredOutputsParams(grammar='root ::= "a" ("b" | "c")+ "d"'), n=3, max_tokens=30)
    assert all(re.fullmatch(r"a[bc]+d", o.text) for o in outs if o.finish_reason == "stop"), [o.text for o in outs]
    lark = 'start: "x" NUM\nNUM: /[0-9]{2}/'
    outs = sample(llm, StructuredOutputsParams(grammar=lark), n=3)
    assert all(re.fullmatch(r"x[0-9]{2}", o.text) for o in outs), [o.text for o in outs]
    outs = sample(llm, StructuredOutputsParams(json_object=True), n=2, max_tokens=8)
    assert all(o.text.startswith("{") for o in outs)


def test_chunked_prefill_and_preemption(tiny_text_model):
    """A prompt longer than the step budget (chunked: its partial chunks sample nothing, so are
    not masked) and a KV cache small enough that running sequences get preempted and recomputed:
    every sequence still obeys its grammar, so each matcher saw exactly its sequence's tokens."""
    llm = LLM(tiny_text_model, dtype="float32", block_size=4, num_gpu_blocks_override=40, max_model_len=128,
              max_num_batched_tokens=16, enable_prefix_caching=True)
    long_prompt = "word " * 60
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(regex=r"(ab|cd){5,18}"))
    outs = llm.generate([long_prompt, "short", long_prompt], [params] * 3)
    stats = llm.llm_engine.get_stats()
    assert stats["num_preemptions"] > 0, stats
    for out in outs:
        for o in out.outputs:
            assert re.fullmatch(r"(ab|cd){5,18}", o.text), o.text


def test_grammar_state_sync_rolls_back_and_replays(llm):
    engine = llm.llm_engine
    so = StructuredOutputsParams(regex=r"(ab)+")
    state = engine.structured_outputs.new_state(engine.compile_structured_outputs(SamplingParams(structured_outputs=so)))
    tok = engine.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ("a", "b", "a", "b")]
    for t in ids:
        assert state.accept(t)
    state.sync(ids[:2])  # two tokens dropped: rollback
    assert state.accepted == ids[:2]
    state.sync([])  # everything dropped
    assert state.accepted == []
    state.sync(ids)  # replay
    assert state.accepted == ids and not state.failed
    assert not state.accept(tok.convert_tokens_to_ids("c")) and state.failed


def test_bitmask_allows_exactly_the_grammar_prefixes(llm):
    engine = llm.llm_engine
    tok = engine.tokenizer
    compiled = engine.compile_structured_outputs(SamplingParams(structured_outputs=StructuredOutputsParams(
        choice=["yes", "no"])))
    state = engine.structured_outputs.new_state(compiled)
    vocab = engine.model_config.vocab_size
    mask = GrammarBitmask(4, vocab).fill([(2, state)])
    allowed = unpack_bitmask(mask.bitmask[2:3], vocab)[0].nonzero().flatten().tolist()
    texts = {t: tok.decode([t]) for t in allowed}
    assert texts and all(s and ("yes".startswith(s) or "no".startswith(s)) for s in texts.values()), texts
    assert {"yes", "no"} & set(texts.values())
    logits = torch.zeros(3, vocab)
    expected = logits.clone()
    apply_bitmask_torch(expected, mask.bitmask, [2])
    mask.apply(logits)  # xgrammar's kernel
    assert torch.equal(torch.isinf(logits), torch.isinf(expected))
    assert not torch.isinf(logits[:2]).any() and torch.isinf(logits[2]).sum() == vocab - len(allowed)


@pytest.mark.parametrize("so, where", [
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json"),
    (StructuredOutputsParams(json="{not json"), "json"),
    (StructuredOutputsParams(regex="(unclosed"), "regex"),
    (StructuredOutputsParams(grammar="root ::= undefined_rule"), "grammar"),
    (StructuredOutputsParams(choice=[]), "choice"),
    (StructuredOutputsParams(json={"type": "string"}, whitespace_pattern=r"\s*"), "whitespace_pattern"),
])
def test_bad_constraints_raise_before_queueing(llm, so, where):
    with pytest.raises(InvalidRequestError, match=f"structured_outputs.{where}") as e:
        llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=so))
    assert e.value.param == f"structured_outputs.{where}"
    assert not llm.llm_engine.has_unfinished_requests()


def test_compile_timeout_and_compile_thread(llm, monkeypatch):
    manager = llm.llm_engine.structured_outputs
    backend = manager.backend
    seen = []
    slow = threading.Event()
    real = backend._compile_uncached

    def compile_spy(spec):
        seen.append(threading.current_thread().name)
        if "slow" in spec.text:
            slow.wait(5)
        return real(spec)

    monkeypatch.setattr(backend, "_compile_uncached", compile_spy)
    monkeypatch.setattr(manager, "config", StructuredOutputsConfig(compile_timeout_s=0.2))
    try:
        with pytest.raises(InvalidRequestError, match="longer than 0.2 s"):
            llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
                regex="slow[0-9]")))
    finally:
        slow.set()
    assert seen and all(name.startswith(COMPILE_THREAD_PREFIX) for name in seen)
    out = llm.generate(["x"], SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="ok")))
    assert out[0].outputs[0].text == "ok"


def test_beam_search_with_structured_outputs_refused(llm):
    with pytest.raises(ValueError, match="beam"):
        llm.llm_engine.prepare_request("r", "x", SamplingParams(use_beam_search=True, temperature=0, max_tokens=4,
                                                                structured_outputs=StructuredOutputsParams(
                                                                    regex="a")))


def test_params_validation():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="needs one"):
        StructuredOutputsParams(disable_any_whitespace=True)
    with pytest.raises(ValueError, match="xgrammar"):
        StructuredOutputsConfig(backend="guidance")
    with pytest.raises(ValueError, match="--reasoning-parser"):
        StructuredOutputsConfig.from_cli({"reasoning_parser": "deepseek_r1"})
    with pytest.raises(ValueError, match="unknown key"):
        StructuredOutputsConfig.from_cli('{"bogus": 1}')
    assert StructuredOutputsConfig.from_cli('{"backend": "xgrammar", "disable_any_whitespace": true}') \
        == StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)


def test_per_request_logits_processors_offline(llm):
    from tests.logitsprocs_examples import ForceTokenProcessor, forbid_prompt_tokens

    out = llm.generate(["Hello there"], SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True,
                                                       logits_processors=[ForceTokenProcessor(42, after=2)]))
    assert out[0].outputs[0].token_ids[2:] == [42, 42, 42]
    prompt_ids = llm.llm_engine.tokenizer.encode("Hello there")
    out = llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, logits_processors=[forbid_prompt_tokens]))
    assert not set(out[0].outputs[0].token_ids) & set(prompt_ids)


def test_resolve_request_logits_processors():
    from lmserve.worker.logits_processors.per_request import resolve_request_logits_processors

    with pytest.raises(InvalidRequestError, match="--logits-processor-pattern"):
        resolve_request_logits_processors(["tests.logitsprocs_examples.ForceTokenProcessor"], None)
    with pytest.raises(InvalidRequestError, match="not allowed"):
        resolve_request_logits_processors(["os.system"], r"tests\.logitsprocs_examples\.")
    with pytest.raises(InvalidRequestError, match="could not be constructed"):
        resolve_request_logits_processors([{"qualname": "tests.logitsprocs_examples.ForceTokenProcessor"}],
                                          r"tests\.")
    (proc,) = resolve_request_logits_processors(
        [{"qualname": "tests.logitsprocs_examples.ForceTokenProcessor", "args": [7], "kwargs": {"after": 1}}],
        r"tests\.")
    assert proc.token_id == 7 and proc.after == 1
