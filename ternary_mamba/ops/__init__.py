"""Compiled kernels and the one dispatch point between them and the PyTorch reference.

build.py (compile + load csrc/), kernels.py (ctypes bindings), autograd.py (training kernels as autograd
Functions), losses.py (fused CE / KL), dispatch.py (which path runs: device, dtype, `reference_path()`)."""
