"""Pictures of what a policy did: the time field and mask over the steps, image grids (PNG)."""

from __future__ import annotations

import os

import numpy as np
import torch


def field_strip(trajectory, path: str | os.PathLike, sample: int = 0, max_steps: int = 12) -> str:
    """One PNG: row 1 the update field tau_k per step, row 2 the policy's mask (if any).

    Colour scale is fixed to [0, 1] (1 = noise) so strips from different policies compare.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = trajectory.num_steps
    steps = list(range(k)) if k <= max_steps else np.linspace(0, k - 1, max_steps).round().astype(int).tolist()
    has_mask = any(m is not None for m in trajectory.masks)
    rows = 2 if has_mask else 1
    fig, axes = plt.subplots(rows, len(steps), figsize=(1.4 * len(steps), 1.5 * rows + 0.4), squeeze=False)
    for j, s in enumerate(steps):
        ax = axes[0][j]
        im = ax.imshow(trajectory.tau[s][sample].float().numpy(), vmin=0, vmax=1, cmap="magma")
        ax.set_title(f"k={s}", fontsize=8)
        ax.axis("off")
        if has_mask:
            m = trajectory.masks[s]
            axes[1][j].imshow(np.zeros(trajectory.grid) if m is None else m[sample].float().numpy(),
                              vmin=0, vmax=1, cmap="gray")
            axes[1][j].set_xticks([])
            axes[1][j].set_yticks([])  # keep the frame: an all-ones mask is white on white
    axes[0][0].text(-0.5, 0.5, "tau", transform=axes[0][0].transAxes, ha="right", va="center", fontsize=8)
    if has_mask:
        axes[1][0].text(-0.5, 0.5, "mask", transform=axes[1][0].transAxes, ha="right", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def image_grid(images, cols: int | None = None, rows: int | None = None, *, pad: int = 0, labels_left=None,
               labels_top=None, cell: int | None = None):
    """Tile equally sized PIL images (row-major) into one PIL image on white.

    ``cols`` defaults to about the square root of the count, ``rows`` to what the images fill;
    ``pad`` pixels of white around and between cells; optional row / column labels; ``cell``
    resizes every image to a square of that side (nearest neighbour, so pixels stay sharp).
    """
    import math

    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = rows or math.ceil(len(images) / cols)
    w, h = images[0].size
    if cell:
        w = h = cell
        images = [im.resize((cell, cell), Image.NEAREST) for im in images]
    pad_left = 0 if not labels_left else 8 + 6 * max(len(str(s)) for s in labels_left)
    pad_top = 0 if not labels_top else 14
    grid = Image.new("RGB", (pad_left + cols * (w + pad) + pad, pad_top + rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (pad_left + pad + c * (w + pad), pad_top + pad + r * (h + pad)))
    for r, s in enumerate(labels_left or []):
        draw.text((2, pad_top + pad + r * (h + pad) + h // 2 - 5), str(s), fill="black")
    for c, s in enumerate(labels_top or []):
        draw.text((pad_left + pad + c * (w + pad) + 2, 1), str(s), fill="black")
    return grid


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().byte().cpu().numpy()
