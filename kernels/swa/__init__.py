"""Sliding-window attention: reference (naive.py), torch blockwise path (blockwise.py), Triton kernels (triton.py)."""
