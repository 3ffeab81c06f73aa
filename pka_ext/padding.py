"""Conversions between right-padded and left-padded batches.

The op and the modules take left-padded sequences: sequence b occupies positions
``T - lengths[b] ... T - 1``, so position ``T - 1`` is always the most recent item and the positional
kernels line up with recency whatever the length. Pipelines that pad on the right (the valid items
first, as most NLP-style collators do) convert on the way in and, if they need to, on the way out.
"""

from __future__ import annotations

import numbers

import torch


def integer_lengths(lengths, device=None) -> torch.Tensor:
    """``lengths`` (a tensor or a sequence) as a tensor of its integer dtype; the check the
    modules and the padding conversions share."""
    lengths = torch.as_tensor(lengths, device=device)
    # An empty batch's lengths ([], torch.tensor([]), np.array([])) come out in the default float
    # dtype, as nothing says otherwise; with no elements there is no non-integer to refuse.
    if lengths.numel() and (lengths.dtype == torch.bool or lengths.is_floating_point()
                            or lengths.is_complex()):
        raise TypeError(f"lengths must hold integers, got {lengths.dtype}")
    return lengths


def _check(x, lengths) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, T, ...] (batch, then time), got shape {tuple(x.shape)}")
    B, T = x.shape[:2]
    lengths = integer_lengths(lengths)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [B] = [{B}] to match x of shape {tuple(x.shape)}, "
                         f"got shape {tuple(lengths.shape)}")
    # Widened first, as the modules do: uint64 (numpy's unsigned counts) has no comparisons in torch.
    # A uint64 length of 2**63 or more wraps negative here and is refused like any other.
    wide = lengths.long()
    # Read on the host (a synchronisation for CUDA lengths): an out-of-range length would otherwise
    # shift a sequence partly out of the batch without a word.
    bad = ((wide < 0) | (wide > T)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        value = int(wide[i]) + (2**64 if lengths.dtype == torch.uint64 and wide[i] < 0 else 0)
        raise ValueError(f"lengths[{i}] = {value} is outside [0, T] = [0, {T}]")
    return wide.to(x.device)


def _fill(x: torch.Tensor, pad_value) -> torch.Tensor:
    """pad_value as a scalar tensor of x's dtype (on the CPU: a scalar to any device, no
    synchronisation), refusing a value an integer dtype would change."""
    if isinstance(pad_value, numbers.Number) and hasattr(pad_value, "item"):
        pad_value = pad_value.item()  # a numpy scalar (a vocabulary's pad id) as its Python number
    if isinstance(pad_value, torch.Tensor) or not isinstance(pad_value, (int, float, bool)):
        raise TypeError(f"pad_value must be a Python number, got {type(pad_value).__name__}")
    try:
        fill = torch.tensor(pad_value, dtype=x.dtype)
    except RuntimeError as e:  # overflow of an integer dtype
        raise ValueError(f"pad_value={pad_value!r} does not fit x's dtype {x.dtype}: {e}") from None
    # Floating dtypes round as usual; an integer one would truncate (0.5 -> 0) without a word.
    if not x.is_floating_point() and not x.is_complex() and fill.item() != pad_value:
        raise ValueError(f"pad_value={pad_value!r} is not representable in x's dtype {x.dtype} "
                         f"(it would become {fill.item()!r})")
    return fill


def _move(x: torch.Tensor, lengths: torch.Tensor, pad_value, to_left: bool) -> torch.Tensor:
    B, T = x.shape[:2]
    pos = torch.arange(T, device=x.device)
    shift = (T - lengths)[:, None]  # [B, 1]: how far a sequence moves between the two layouts
    src = pos - shift if to_left else pos + shift  # [B, T]: source position of each output position
    valid = (src >= 0) & (src < T)
    trailing = (1,) * (x.dim() - 2)
    index = src.clamp(0, T - 1).view(B, T, *trailing).expand_as(x)
    return torch.where(valid.view(B, T, *trailing), x.gather(1, index), _fill(x, pad_value))


def to_left_padding(x: torch.Tensor, lengths, pad_value=0) -> torch.Tensor:
    """A right-padded batch ``[B, T, ...]`` (sequence b in rows ``0 ... lengths[b] - 1``) as the
    left-padded batch the op and the modules take.

    Parameters
    ----------
    x : Tensor
        ``[B, T, ...]``, time on dimension 1; any dtype (item ids as well as embeddings).
    lengths : Tensor or sequence of int
        ``[B]`` valid lengths in ``[0, T]``; checked on the host.
    pad_value : number
        Written at the padded positions (default 0, the item-id padding of the recommender).

    Returns
    -------
    Tensor
        Same shape, dtype and device; differentiable with respect to ``x`` (padded positions get
        no gradient).
    """
    return _move(x, _check(x, lengths), pad_value, to_left=True)


def to_right_padding(x: torch.Tensor, lengths, pad_value=0) -> torch.Tensor:
    """The inverse of :func:`to_left_padding`: a left-padded batch ``[B, T, ...]`` (sequence b in
    rows ``T - lengths[b] ... T - 1``, e.g. the output of :class:`PKATransformer`) with each
    sequence moved to the front. Parameters and result as in :func:`to_left_padding`."""
    return _move(x, _check(x, lengths), pad_value, to_left=False)
