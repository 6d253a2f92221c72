"""LoRA adapters: the request type (``request.py``, vLLM's ``vllm.lora.request``), PEFT checkpoints
(``checkpoint.py``), the LRU of loaded adapters (``cache.py``) and the batched delta of one step
(``batch.py``)."""
