"""hf-ahfa: Adaptive Hybrid Flash Attention for Hugging Face Transformers.

``import hf_ahfa`` registers ``attn_implementation="ahfa"`` with Transformers and guards models that
do not route attention through Transformers' AttentionInterface (see ``hf_ahfa.patches``).
"""

from hf_ahfa.adaptive import estimate_layout
from hf_ahfa.api import attention
from hf_ahfa.block_layout import BlockLayout
from hf_ahfa.calibrate import Calibration, calibrate
from hf_ahfa.integration import NAME, register
from hf_ahfa.policy import AdaptivePolicy, configure, override
from hf_ahfa.telemetry import record
from hf_ahfa import nn  # MultiheadAttention for models outside Transformers (imports nothing new)

__version__ = "0.1.0"
__all__ = ["attention", "estimate_layout", "AdaptivePolicy", "configure", "override", "record", "BlockLayout", "register", "NAME",
           "calibrate", "Calibration", "nn", "__version__"]

register()
