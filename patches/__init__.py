"""Patches for models that Transformers' AttentionInterface cannot reach (``hf_ahfa.patches``).

Models such as bloom, mpt, falcon or gpt_neo compute attention in their own code. A patch module here
reroutes one model type through ``hf_ahfa``: it names ``MODEL_TYPE`` and has ``apply(config)`` (False where
the installed release needs something it does not do) and ``revert()``.
``PATCHES`` maps model types to them (as Liger-Kernel keys its patches by model type); asking a model for
``attn_implementation="ahfa"`` applies its patch, and a model type without one raises a ValueError naming it
instead of silently running another attention.
"""

from __future__ import annotations

import importlib

PATCHES = {  # model type -> patch module (imported when first needed)
    "bloom": "hf_ahfa.patches.bloom", "falcon": "hf_ahfa.patches.falcon", "gpt_neo": "hf_ahfa.patches.gpt_neo",
    "mpt": "hf_ahfa.patches.mpt",
}


def apply(model_type: str, config=None) -> bool:
    """Apply the patch of ``model_type`` for a model with ``config``; False when there is none for it on this
    Transformers release. A patch may raise a ValueError for a configuration it cannot run."""
    if model_type not in PATCHES:
        return False
    return importlib.import_module(PATCHES[model_type]).apply(config) is not False


def revert(model_type: str) -> None:
    """Take the patch of ``model_type`` out of Transformers (models already built keep their modules; the
    next load with ``attn_implementation="ahfa"`` applies it again)."""
    if model_type not in PATCHES:
        raise ValueError(f"no hf_ahfa patch for model type {model_type!r}; patched types: {sorted(PATCHES)}")
    importlib.import_module(PATCHES[model_type]).revert()
