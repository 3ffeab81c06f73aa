"""pka-ext: positional-kernel attention (PSA) for PyTorch, with a sequential recommender."""

from pka_ext._library import built_with_cuda
from pka_ext.modules import PKAttention, PKATransformer, PositionalKernel
from pka_ext.ops import pka_attention
from pka_ext.padding import to_left_padding, to_right_padding

__all__ = [
    "pka_attention",
    "built_with_cuda",
    "PositionalKernel",
    "PKAttention",
    "PKATransformer",
    "to_left_padding",
    "to_right_padding",
]
__version__ = "0.1.0"
