"""Per-step attention metadata for a flat (varlen) batch, passed explicitly down the model.

The batch is B sequences whose new tokens are laid out back to back: T = sum(query_lens)
tokens. Sequences are ordered with every decode (query_len == 1) first, then the
prefills (chunks of prompts, possibly continuing a cached prefix), so a backend can
treat ``[0, num_decodes)`` as one batched decode.

Invariants:
- ``query_start_loc[i+1] - query_start_loc[i] == query_lens[i]`` and ``query_start_loc[-1] == T``.
- ``seq_lens[i]`` is the context length after this step (cached + new tokens), so the new
  tokens of sequence i sit at positions ``seq_lens[i] - query_lens[i] .. seq_lens[i] - 1``.
- ``slot_mapping[t] = block_id * block_size + offset`` is where token t's K/V is written;
  a slot of -1 means "do not write" (padding).
- ``block_tables[i, j]`` is the j-th KV block of sequence i; entries past the
  sequence's last block are padding (0) and must never be read as context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmserve.lora.batch import LoRAStepMapping


@dataclass
class AttentionMetadata:
    num_decodes: int  # the first num_decodes sequences have query_len == 1
    query_start_loc: torch.Tensor  # [B + 1] int32, on the model's device
    seq_lens: torch.Tensor  # [B] int32, on the model's device
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, on the model's device
    slot_mapping: torch.Tensor  # [T] int64, on the model's device
    block_size: int
    # Host copies, so that backends need no device->host sync:
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    # True when every new token of this step is a generated one (no prompt token, not even a
    # 1-token chunk after a prefix-cache hit). Quantized layers take their few-row int kernels
    # only then, so a prompt is computed the same way whether or not its prefix was cached.
    decode_only: bool = False
    # The step's LoRA adapters per row (``lmserve/lora/batch.py``); None when no row has one.
    lora: LoRAStepMapping | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens_cpu))


# One KV cache tensor per attention layer:
#   [2, num_blocks, block_size, num_kv_heads, head_dim]  (index 0 = keys, 1 = values)
KVCache = torch.Tensor
