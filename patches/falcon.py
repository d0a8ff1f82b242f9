"""Falcon (rotary variants: Falcon-7B/40B/RW, new and old decoder layouts, multi-query) through ahfa.

From the Transformers releases whose ``FalconAttention`` calls the AttentionInterface (5.2x), Falcon needs no
code of ours, only the guard's leave: the class still declares ``_supports_attention_backend = False`` because
its ALiBi variant passes the bias inside a float attention mask, which ahfa refuses (``alibi=True`` raises at
load). Earlier releases compute Falcon's attention in its own code: no patch there (the guard raises).
"""

from __future__ import annotations

MODEL_TYPE = "falcon"


def _module():
    from transformers.models.falcon import modeling_falcon

    return modeling_falcon


def apply(config=None) -> bool:
    """Whether Falcon runs through ahfa on this release (``config``: the model's, to refuse ALiBi Falcon)."""
    if not hasattr(_module(), "ALL_ATTENTION_FUNCTIONS"):  # its own attention code on this release
        return False
    if config is not None and getattr(config, "alibi", False):
        raise ValueError("attn_implementation='ahfa' does not run Falcon with alibi=True: it passes ALiBi as an "
                         "additive float attention mask; use attn_implementation='eager' or 'sdpa'")
    return True


def revert() -> None:
    """Nothing to undo (the patch changes no code)."""
