"""Patches for models that Transformers' AttentionInterface cannot reach (``hf_ahfa.patches``).

Models such as bloom, mpt, gptj, falcon or codegen compute attention in their own code. Until a patch
module here reroutes one of them (and adds its model type to
``hf_ahfa.integration.PATCHED_MODEL_TYPES``), asking such a model for ``attn_implementation="ahfa"``
raises a ValueError naming the model type instead of silently running another attention.
"""
