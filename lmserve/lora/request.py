"""``LoRARequest``: which adapter a request runs with (as ``vllm.lora.request.LoRARequest``).

``lora_int_id`` identifies the adapter's weights (globally unique, >= 1): two requests with the same
id share one loaded copy and share prefix-cache blocks; different ids never do. ``lora_name`` is
what the server lists and what requests name in ``model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, eq=False)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = field(default=None)
    load_inplace: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer > 0, got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ValueError("lora_path cannot be empty")
        if not self.lora_name:
            raise ValueError("lora_name cannot be empty")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        """As vLLM: adapters compare by name."""
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
