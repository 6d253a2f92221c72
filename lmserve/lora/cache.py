"""``LoRACache``: the loaded adapters, an LRU of at most ``LoRAConfig.cache_size`` entries
(``--max-cpu-loras``), keyed by ``lora_int_id``.

Thread safety: one lock guards the map; an adapter is read from disk outside it, so a load never
holds up other callers (two concurrent loads of one id both succeed; the later one is kept).
Eviction only drops the cache's reference: a request holds its ``LoRAAdapter`` from the moment it
is prepared until it finishes, so an adapter in use is never freed under it (even when unloaded).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from lmserve.config import LoRAConfig
from lmserve.lora.checkpoint import LoRAAdapter, load_adapter
from lmserve.lora.request import LoRARequest


class LoRACache:
    def __init__(self, config: LoRAConfig, hf_config: Any, model_dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.config = config
        self.hf_config = hf_config
        self.dtype = config.lora_dtype or model_dtype
        self.device = device
        self._lock = threading.Lock()
        self._adapters: OrderedDict[int, LoRAAdapter] = OrderedDict()

    def get(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter of ``request``, loaded (and checked) on first use; ValueError if it cannot be."""
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        with self._lock:
            adapter = self._adapters.get(request.lora_int_id)
            if adapter is not None and not request.load_inplace:
                if adapter.path != request.lora_path:
                    raise ValueError(f"lora_int_id {request.lora_int_id} is already used by the adapter at "
                                     f"{adapter.path!r}: give each adapter its own id")
                self._adapters.move_to_end(request.lora_int_id)
                return adapter
        adapter = load_adapter(request.lora_path, request.lora_int_id, request.lora_name, self.hf_config,
                               self.config.max_lora_rank, self.dtype, self.device)
        with self._lock:
            self._adapters[request.lora_int_id] = adapter
            self._adapters.move_to_end(request.lora_int_id)
            while len(self._adapters) > self.config.cache_size:
                self._adapters.popitem(last=False)
        return adapter

    def remove(self, lora_id: int) -> bool:
        """Drops the cache's reference (requests running with it keep theirs)."""
        with self._lock:
            return self._adapters.pop(lora_id, None) is not None

    def loaded_ids(self) -> list[int]:
        with self._lock:
            return list(self._adapters)
