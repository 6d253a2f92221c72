"""Reasoning parsers (whole output vs. streamed at every split), --reasoning-config, and the
thinking-budget logits processor on hand-made token sequences."""

from __future__ import annotations

import pytest
import torch

from lmserve.reasoning import ReasoningParserManager
from lmserve.reasoning.config import ReasoningConfig
from lmserve.sampling_params import SamplingParams
from lmserve.worker.logits_processors.interface import BatchUpdate
from lmserve.worker.logits_processors.thinking_budget import ThinkingBudgetLogitsProcessor

CASES = [
    ("qwen3", "<think>\nLet me think.\n</think>\n\nThe answer.", {}, "\nLet me think.\n", "\n\nThe answer."),
    ("qwen3", "still thinking </thi", {}, "still thinking </thi", None),
    ("qwen3", "no thinking</think>at all", {"enable_thinking": False}, None, "no thinking</think>at all"),
    ("deepseek_r1", "reasoning</think>content", {}, "reasoning", "content"),
    ("deepseek_r1", "<think>r</think>", {}, "r", None),
    ("deepseek_v3", "r</think>c", {"thinking": True}, "r", "c"),
    ("deepseek_v3", "r</think>c", {}, None, "r</think>c"),
    ("mistral", "pre[THINK]thought[/THINK]post", {}, "thought", "prepost"),
    ("mistral", "plain [THI", {}, None, "plain [THI"),
]


def _stream(name: str, pieces: list[str], kwargs: dict) -> tuple[str, str]:
    parser = ReasoningParserManager.get_reasoning_parser(name)(None, chat_template_kwargs=kwargs)
    reasoning = content = text = ""
    deltas = []
    for piece in pieces:
        prev, text = text, text + piece
        deltas.append(parser.extract_reasoning_streaming(prev, text, piece, [], [], []))
    deltas.append(parser.finish_streaming(text))
    for d in deltas:
        if d is not None:
            reasoning += d.reasoning or ""
            content += d.content or ""
    return reasoning, content


@pytest.mark.parametrize("name,text,kwargs,reasoning,content", CASES)
def test_whole_and_every_split(name: str, text: str, kwargs: dict, reasoning, content) -> None:
    parser = ReasoningParserManager.get_reasoning_parser(name)(None, chat_template_kwargs=kwargs)
    assert parser.extract_reasoning(text, None) == (reasoning, content)
    expect = (reasoning or "", content or "")
    assert _stream(name, list(text), kwargs) == expect
    for k in range(len(text) + 1):
        assert _stream(name, [text[:k], text[k:]], kwargs) == expect, k


def test_reasoning_config_flag() -> None:
    config = ReasoningConfig.from_flag('{"reasoning_end_str": "Done.</think>"}')
    assert config.reasoning_end_str == "Done.</think>" and not config.enabled
    with pytest.raises(ValueError, match="unknown key"):
        ReasoningConfig.from_flag('{"think_end": "x"}')


class _Tok:
    """Encodes each character as its code point."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def _run_budget(budget: int, prompt: list[int], model: list[int], start: list[int], end: list[int],
                steps: int) -> list[int]:
    """Greedy decoding where the 'model' prefers ``model[i]`` at step i; returns the output."""
    params = SamplingParams(thinking_token_budget=budget)
    params._thinking_token_ids = (start, end)
    ThinkingBudgetLogitsProcessor.validate_params(params)
    proc = ThinkingBudgetLogitsProcessor(None, torch.device("cpu"), False)
    output: list[int] = []
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params, prompt, output)], moved=[]))
    for step in range(steps):
        logits = torch.zeros(1, 128)
        logits[0, model[step]] = 5.0
        output.append(int(proc.apply(logits).argmax(dim=-1)))
        proc.update_state(None)
    return output


def test_thinking_budget_forces_the_end_markers() -> None:
    tok = _Tok()
    config = ReasoningConfig(reasoning_end_str="!>").resolve(tok, type("P", (), {"reasoning_start_str": "<",
                                                                                "reasoning_end_str": ">"})())
    start, end = config.start_token_ids, config.end_token_ids
    assert (start, end) == ([ord("<")], [ord("!"), ord(">")])
    model = [ord(c) for c in "<abcdefgh>xyz"]
    assert "".join(map(chr, _run_budget(3, [], model, start, end, 8))) == "<abc!>fg"
    assert "".join(map(chr, _run_budget(0, [], model, start, end, 4))) == "<!>c"
    assert "".join(map(chr, _run_budget(100, [], model, start, end, 13))) == "<abcdefgh>xyz"
    # The prompt opened the section (R1's template): counting starts at the first output token.
    assert "".join(map(chr, _run_budget(2, [ord("<")], list(map(ord, "abcdef")), start, end, 5))) == "ab!>e"


def test_thinking_budget_needs_markers() -> None:
    with pytest.raises(ValueError, match="--reasoning-parser"):
        ThinkingBudgetLogitsProcessor.validate_params(SamplingParams(thinking_token_budget=5))
    ThinkingBudgetLogitsProcessor.validate_params(SamplingParams(thinking_token_budget=-1))


@pytest.mark.slow
def test_thinking_budget_in_the_engine(tiny_text_model) -> None:
    """Through the whole engine: the prompt's last token opens the section, so after 3 generated
    tokens the two end-marker tokens are forced, then decoding goes on freely."""
    from lmserve import LLM

    llm = LLM(tiny_text_model, dtype="float32", block_size=4, kv_cache_memory=16 * 2**20, max_model_len=128)
    prompt = llm.get_tokenizer().encode("The history of the city begins")
    free = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8,
                                                                       ignore_eos=True))[0].outputs[0].token_ids
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, thinking_token_budget=3)
    params._thinking_token_ids = ([prompt[-1]], [11, 12])
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids
    assert list(out[:3]) == list(free[:3]) and list(out[3:5]) == [11, 12]
    assert len(out) == 8
