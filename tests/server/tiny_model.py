"""A tiny random-weight Llama checkpoint with a real (trained, byte-level BPE) tokenizer
and the ChatML chat template, written to a directory in about a second.

Byte-level BPE means multi-byte characters split across tokens, so the server's
incremental detokenization and logprob token texts are exercised for real.
"""

from __future__ import annotations

import json
import os

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A robot may not injure a human being or, through inaction, allow a human being to come to harm.",
    "Hello! How are you today? I am fine, thank you.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Les élèves étudient à l'école. Ünïcödé ☃ 日本語のテキスト 😀",
    "one two three four five six seven eight nine ten eleven twelve",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token=None, pad_token="<|endoftext|>", chat_template=CHATML)


def write_tiny_llama(path: str, max_position_embeddings: int = 512, seed: int = 0) -> str:
    """Writes config.json, model.safetensors, tokenizer files and generation_config.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer()
    tok.save_pretrained(path)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=True, bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
                         eos_token_id=eos, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # sharp-ish random distributions: varied, deterministic text
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() >= 2 else 0.1) + (p.dim() == 1))
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "bos_token_id": config.bos_token_id}, f)
    return path


if __name__ == "__main__":
    import sys
    print(write_tiny_llama(sys.argv[1]))
