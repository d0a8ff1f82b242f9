"""Triton kernels and their launch wrappers (``hf_ahfa.kernels``).

Imports torch and triton only, never Transformers. ``flash`` (dense forward/backward and split-KV decode),
``sparse`` (block-sparse forward/backward), ``estimate`` (the adaptive mode's estimator) and ``select`` (its
selection) register the ``hf_ahfa::*`` torch ops; ``flash_kernels`` / ``estimate_kernels`` / ``select_kernels``
hold the kernels, ``common`` their shared jit helpers (the one visibility rule), ``configs`` / ``tuning`` the
launch configurations. Which op runs a call is decided by ``hf_ahfa.router``, never here.
"""
