"""Pure-PyTorch reference for positional-kernel attention.

It materialises every intermediate ([B, H, T, T] scores, masks and probabilities) and follows the
op's contract line by line, so tests and benchmarks use it as the oracle. It never imports the
compiled extension.
"""

from python_ref.attention import pka_attention
from python_ref.checks import check_attention_args
from python_ref.dropout import dropout_keep_mask, dropout_threshold

__all__ = ["pka_attention", "check_attention_args", "dropout_keep_mask", "dropout_threshold"]
