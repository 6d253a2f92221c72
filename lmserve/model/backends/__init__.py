"""Compute backends of the model layers: one object per layer, chosen once when the model is built.

- ``cpu_features``: the CPU's instruction-set features and which native kernels they give;
- ``plan``: ``BackendPlan``, the pure selection rules (device, dtype, features, settings, shape
  -> backend name and reason) and the loaded native kernels;
- ``linear``, ``quantized``, ``elementwise``, ``attention``: the backend classes per op;
- ``decode_step``: the native one-call decode step, a backend of the whole model.

``lmserve.model.loader.binding.bind_backends`` walks a loaded model, asks the plan for each layer's
backend, gives it to the layer and logs the choices as one table. This package imports no layer
module (layers import it), so it holds no import cycle.
"""
