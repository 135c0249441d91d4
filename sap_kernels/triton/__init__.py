"""Triton kernels for sap_kernels (backend="triton"): see ops.py and kernels.py.

Importing this package needs triton; sap_kernels.ops imports it lazily."""
