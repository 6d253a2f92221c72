"""Mirror of ``vllm.v1.sample``."""
