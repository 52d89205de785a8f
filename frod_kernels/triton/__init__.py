"""Triton kernels for the two kernel families (DESIGN.md section 6), registered as the ``triton`` backend."""
