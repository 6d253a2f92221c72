"""Native CPU kernels, compiled from C at first use (``build.py``). Each must agree with a
pure-torch reference, which its caller falls back to when the kernel cannot be built or does not
take the inputs; ``LMSERVE_DISABLE_CPU_KERNELS=1`` switches them off."""

from lmserve.model.layers.cpu_kernels.cpu_ops import CpuOps, attach_cpu_ops, get_cpu_ops
from lmserve.model.layers.cpu_kernels.paged_attention import (
    CpuPagedAttention,
    get_paged_attention_kernel,
    log_fallback_once,
)
from lmserve.model.layers.cpu_kernels.sgemm import CpuPanelGemm, get_panel_kernel, get_sbgemm_kernel, get_sgemm_kernel

__all__ = ["CpuOps", "CpuPagedAttention", "CpuPanelGemm", "attach_cpu_ops", "get_cpu_ops", "get_paged_attention_kernel",
           "get_panel_kernel", "get_sbgemm_kernel", "get_sgemm_kernel", "log_fallback_once"]
