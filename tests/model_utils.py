"""Test helpers for the model layer: a minimal paged-cache bookkeeper that builds
AttentionMetadata by hand, and tiny random-weight Hugging Face models."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lmserve.model.layers.attention import KVCacheSpec
from lmserve.model.layers.attention_metadata import AttentionMetadata


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    order: list[object]  # sequence ids in batch order (decodes first)
    starts: dict[object, int]  # first token index of each sequence in the flat batch


class PagedTestCache:
    """Gives sequences KV blocks (shuffled, so a sequence's blocks are not contiguous) and
    builds the flat batch of one step; remembers how many tokens each sequence has cached."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int = 64, block_size: int = 4, seed: int = 0,
                 device: str = "cpu") -> None:
        self.block_size = block_size
        self.device = device
        self.kv_caches = spec.allocate(num_blocks, block_size, device)
        free = list(range(num_blocks))
        random.Random(seed).shuffle(free)
        self.free = free
        self.blocks: dict[object, list[int]] = {}
        self.num_cached: dict[object, int] = {}

    def step(self, chunks: list[tuple[object, list[int]]], pad_tokens: int = 0, decode_only: bool = False
             ) -> StepBatch:
        """chunks: (sequence id, new token ids) per sequence; one-token chunks go first as decodes.
        ``pad_tokens`` appends padding tokens (slot -1) past the batch's real tokens.
        ``decode_only``: every new token is a generated one (``AttentionMetadata.decode_only``)."""
        decodes = [c for c in chunks if len(c[1]) == 1]
        prefills = [c for c in chunks if len(c[1]) > 1]
        ordered = decodes + prefills
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qlens: list[int] = []
        seq_lens: list[int] = []
        starts: dict[object, int] = {}
        for sid, toks in ordered:
            cached = self.num_cached.get(sid, 0)
            total = cached + len(toks)
            blocks = self.blocks.setdefault(sid, [])
            while len(blocks) * self.block_size < total:
                blocks.append(self.free.pop())
            starts[sid] = len(ids)
            for j, tok in enumerate(toks):
                pos = cached + j
                ids.append(tok)
                positions.append(pos)
                slots.append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            qlens.append(len(toks))
            seq_lens.append(total)
            self.num_cached[sid] = total
        ids += [0] * pad_tokens
        positions += [0] * pad_tokens
        slots += [-1] * pad_tokens
        max_blocks = max(len(self.blocks[sid]) for sid, _ in ordered)
        table = [self.blocks[sid] + [0] * (max_blocks - len(self.blocks[sid])) for sid, _ in ordered]
        qsl = [0]
        for q in qlens:
            qsl.append(qsl[-1] + q)
        dev = self.device
        meta = AttentionMetadata(
            num_decodes=len(decodes),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(table, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_size=self.block_size,
            query_lens_cpu=qlens,
            seq_lens_cpu=seq_lens,
            decode_only=decode_only,
            max_query_len=max(qlens),
            max_seq_len=max(seq_lens),
        )
        return StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta, order=[sid for sid, _ in ordered], starts=starts)


def randomize_parameters(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Every parameter random (HF initializes biases to 0 and norms to 1, which would hide
    loading mistakes): matrices ~ N(0, std), 1-D weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise * std)
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            else:
                p.copy_(1.0 + noise * 0.1)


def make_hf_model(config, seed: int = 0):
    """A transformers causal LM with random weights in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_parameters(model, seed)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """Full-sequence logits [len, vocab] from the transformers reference (no cache)."""
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor([token_ids]), use_cache=False)
    return out.logits[0].float()


_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
_GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(w, n_head: int):
    """llama.cpp convert_hf_to_gguf's Q/K permutation (HF rotate-half -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_model, path: str, arch: str, quant: str = "Q8_0") -> None:
    """Write ``hf_model`` as a GGUF file the way llama.cpp's converter would (names, Q/K
    permutation for ``arch == "llama"``, 2-D weights quantized to ``quant``), and round the
    model's own 2-D weights through the same quantization so that it stays the exact reference."""
    import gguf
    import numpy as np

    cfg = hf_model.config
    qtype = gguf.GGMLQuantizationType[quant]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-test-model")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    tied = getattr(cfg, "tie_word_embeddings", False)
    with torch.no_grad():
        for name, t in hf_model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            if name in _GGUF_GLOBAL:
                gname = _GGUF_GLOBAL[name]
            else:
                parts = name.split(".")
                gname = f"blk.{parts[2]}.{_GGUF_BLOCK['.'.join(parts[3:-1])]}.{parts[-1]}"
            arr = t.detach().float().numpy()
            if arr.ndim == 2:
                q = gguf.quants.quantize(arr, qtype)
                t.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(arr.shape)))
                arr = t.detach().float().numpy()
            if arch == "llama" and ".self_attn.q_proj." in name:
                arr = _llama_cpp_permute(arr, cfg.num_attention_heads)
            elif arch == "llama" and ".self_attn.k_proj." in name:
                arr = _llama_cpp_permute(arr, cfg.num_key_value_heads)
            if arr.ndim == 2:
                w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(arr), qtype), raw_dtype=qtype)
            else:
                w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
