"""Residual linear attention: reference (naive.py), torch chunked path and state (chunked.py), Triton kernels
(triton.py), and an Nsight Compute driver for those kernels (profile.py)."""
