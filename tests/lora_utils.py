"""Test helpers for LoRA: PEFT adapters made at test time on a tiny checkpoint (random,
non-zero B matrices so every adapter changes the model), and PEFT's merged model as the reference."""

from __future__ import annotations

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig kwargs: all projections, attention only with rsLoRA, MLP only with a per-module alpha
ADAPTER_SPECS = {
    "all": dict(r=8, lora_alpha=16, target_modules=ALL_TARGETS),
    "qv-rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "mlp": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                alpha_pattern={"down_proj": 32}),
}


def make_peft_adapter(base_path: str, out_dir: str, seed: int, b_std: float = 0.3, **lora_kwargs):
    """Saves a PEFT LoRA adapter of ``base_path`` to ``out_dir``; returns PEFT's merged model (fp32, eval)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: the adapter would change nothing
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
    peft_model.save_pretrained(out_dir)
    return peft_model.merge_and_unload().eval()


def greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outs = []
    with torch.no_grad():
        for p in prompts:
            gen = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs
