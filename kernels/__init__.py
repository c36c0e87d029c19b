"""Device code written in Python: Triton kernels (kernels/triton) and numba CPU kernels (kernels/cpu).

Installed as ``kiln.kernels``. Nothing here imports from ``kiln.ops`` or above.
"""
