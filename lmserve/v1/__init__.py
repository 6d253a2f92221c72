"""Mirror of vLLM's ``vllm.v1`` module layout, so ported imports map 1:1."""
