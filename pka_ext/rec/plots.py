"""Pictures of what PSA learns: the kernels (paper Fig. 1) and averaged attention (Fig. 2).

Needs matplotlib (``pip install pka-ext[plot]``).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from pka_ext.modules import project_heads


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from err
    return plt


def check_image_path(path: str) -> None:
    """Raises a ValueError unless ``path`` names an image file matplotlib can write.

    Checked before any work: savefig would add ``.png`` to a name without a suffix (so the file
    written is not the one named) and fails only at the end on an unknown one.
    """
    _pyplot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; name an image file such as "
                         f"{os.path.join(path, 'kernels.png')}")
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    formats = sorted(FigureCanvasAgg.get_supported_filetypes())
    if suffix not in formats:
        raise ValueError(f"{path}: name an image file ending in one of "
                         f"{', '.join('.' + f for f in formats)}")


@torch.no_grad()
def average_attention(model, contexts, max_batches: int = 8, batch_size: int = 256) -> np.ndarray:
    """Mean attention map [T, T] of the first block over full-length histories.

    For PSA: softmax(scale * Q (A_k K0)^T) with the model's own projections and kernels; for the
    baselines softmax(scale * Q K^T) with their queries and keys (rotated for rope; sasrec's
    positional embeddings are already in the input).
    """
    from pka_ext.rec.evaluate import pad_left

    T = model.cfg.max_len
    full = [c for c in contexts if len(c) >= T][: max_batches * batch_size]
    if not full:
        raise ValueError(f"no history has at least max_len={T} items to average attention over")
    seqs = torch.from_numpy(pad_left(full, T)).to(next(model.parameters()).device)
    captured = {}
    block = model.backbone.blocks[0]
    hook = block.attn.register_forward_hook(lambda m, args, out: captured.update(args=args))
    model.eval()
    model.encode(seqs)
    hook.remove()
    query, key_value = captured["args"][:2]
    attn = block.attn
    if model.cfg.model == "psa":
        q, k, _ = project_heads(attn, query, key_value)
        k = model.backbone.kernel_matrices(T)[0][0].to(k.dtype) @ k
    else:
        q, k, _ = attn.project(query, key_value)
    s = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return s.softmax(-1).mean(dim=(0, 1)).cpu().numpy()


def plot_kernels(model, out_path: str, contexts=None) -> None:
    """Draws A_k of every layer and A_v (PSA), plus the averaged attention map if contexts given.

    A PSA model whose contexts are all shorter than ``max_len`` gets its kernels drawn and the map
    left out with a warning; for a baseline, which has nothing else to draw, that is an error.
    """
    plt = _pyplot()
    T = model.cfg.max_len
    panels = []
    if model.cfg.model == "psa":
        bb = model.backbone
        panels += [(f"A_k layer {i + 1}", m(T)) for i, m in enumerate(bb.key_kernels)]
        panels += [(f"A_v {'shared' if len(bb.value_kernels) == 1 else f'layer {i + 1}'}", m(T))
                   for i, m in enumerate(bb.value_kernels)]
        panels = [(name, a.detach().float().cpu().numpy().reshape(-1, T, T)[0]) for name, a in panels]
    if contexts is not None:
        contexts = list(contexts)
        longest = max(map(len, contexts), default=0)
        if panels and longest < T:
            # The kernels can still be drawn: the built-in data (histories of at most 40 items)
            # with pka-rec train's default max_len of 50, say.
            warnings.warn(f"no history has at least max_len={T} items (the longest has "
                          f"{longest}); the mean attention map is left out", stacklevel=2)
        else:
            panels.append(("mean attention, block 1", average_attention(model, contexts)))
    if not panels:
        raise ValueError("nothing to plot: the model has no kernels and no contexts were given")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    from matplotlib.colors import LogNorm

    for ax, (name, mat) in zip(axes[0], panels):
        shown = np.where(np.tril(np.ones_like(mat)) > 0, mat, np.nan)
        # Attention weights span decades (a row over i+1 keys averages 1/(i+1)); a log scale shows
        # the structure that a linear one hides under the first rows.
        norm = LogNorm(vmin=max(np.nanmin(shown), 1e-4), vmax=1.0) if "attention" in name else None
        im = ax.imshow(shown, cmap="viridis", norm=norm)
        ax.set_title(name)
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{model.cfg.model}: learned positional structure (T={T})")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
