"""ahfa-eval (hf_ahfa.eval): perplexity, GLUE, speed and memory of ahfa against a baseline.

Installed with the ``[eval]`` extra. Imports flow one way: ``hf_ahfa.eval -> hf_ahfa -> hf_ahfa.kernels``.
"""
