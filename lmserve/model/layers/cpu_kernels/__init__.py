"""Native CPU kernels, compiled from C at first use (``build.py``), and their ctypes bindings.
Each must agree with a pure-torch reference; which layer runs which kernel is decided once per
model by ``model/backends/plan.py``. ``LMSERVE_DISABLE_CPU_KERNELS=1`` switches them all off."""
