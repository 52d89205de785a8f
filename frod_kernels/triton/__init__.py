"""Triton kernels for the two kernel families (DESIGN.md section 6), registered as the ``triton`` backend.

:mod:`.ops` registers them (and works without triton installed); :mod:`.row_gather` and :mod:`.sampled_dot` hold
one kernel family each.
"""
