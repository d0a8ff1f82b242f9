"""Triton kernels and their launch wrappers (``hf_ahfa.kernels``).

Imports torch and triton only, never Transformers. The exact flash-attention kernels are the next piece
of work; until they exist, ``hf_ahfa.dispatch`` reports the Triton backend as unavailable.
"""
