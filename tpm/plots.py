"""Pictures of what a policy did: the time fields (update and conditioning) and mask over the steps,
image grids (PNG)."""

from __future__ import annotations

import os

import numpy as np
import torch


def strip_steps(num_steps: int, max_steps: int = 12) -> list[int]:
    """The steps a strip shows: all of them, or ``max_steps`` spread evenly (first and last kept)."""
    if num_steps <= max_steps:
        return list(range(num_steps))
    return np.linspace(0, num_steps - 1, max_steps).round().astype(int).tolist()


def conditioning_shift(trajectory, sample: int | None = None) -> float:
    """Largest |tau_cond - tau_k| over the steps (and tokens): how far the denoiser was told another
    time than the latent's own (0 for policies that leave ``tau_cond`` unset)."""
    pick = (lambda f: f) if sample is None else (lambda f: f[sample])
    shifts = [float((pick(c).float() - pick(t).float()).abs().max())
              for c, t in zip(trajectory.tau_cond, trajectory.tau)]
    return max(shifts, default=0.0)


def field_rows(trajectory, sample: int = 0, max_steps: int = 12, atol: float = 1e-6) -> dict[str, list]:
    """The rows of :func:`field_strip` as ``{label: [(h, w) array per shown step]}``.

    ``"tau"``: the update field tau_k the step starts from; ``"tau_cond - tau"`` (only when a
    policy set ``tau_cond`` away from tau_k somewhere, e.g. AsyncDiff's TPM): the conditioning
    deviation, what the denoiser was told minus the latent's time; ``"mask"`` (only when a policy
    returned one; zeros where a step had none).
    """
    steps = strip_steps(trajectory.num_steps, max_steps)
    rows = {"tau": [trajectory.tau[s][sample].float().numpy() for s in steps]}
    if conditioning_shift(trajectory, sample) > atol:
        rows["tau_cond - tau"] = [(trajectory.tau_cond[s][sample].float() - trajectory.tau[s][sample].float()).numpy()
                                  for s in steps]
    if any(m is not None for m in trajectory.masks):
        rows["mask"] = [np.zeros(trajectory.grid) if trajectory.masks[s] is None
                        else trajectory.masks[s][sample].float().numpy() for s in steps]
    return rows


def field_strip(trajectory, path: str | os.PathLike, sample: int = 0, max_steps: int = 12) -> str:
    """One PNG of what a policy did, a column per step (:func:`field_rows`): the update field tau_k;
    the conditioning deviation tau_cond - tau_k when the policy set ``tau_cond`` (a TPM's update
    field is the synchronous grid, so this row is where its decisions show); the mask, if any.

    tau is drawn on a fixed [0, 1] scale (1 = noise) so strips from different policies compare; the
    deviation on a diverging scale symmetric about 0 (red: told a noisier time, blue: a cleaner one).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = strip_steps(trajectory.num_steps, max_steps)
    rows = field_rows(trajectory, sample, max_steps)
    fig, axes = plt.subplots(len(rows), len(steps), figsize=(1.4 * len(steps) + 0.6, 1.5 * len(rows) + 0.4),
                             squeeze=False)
    dev = rows.get("tau_cond - tau")
    lim = max(max(float(np.abs(d).max()) for d in dev), 1e-6) if dev else 1.0
    scales = {"tau": dict(vmin=0, vmax=1, cmap="magma"), "tau_cond - tau": dict(vmin=-lim, vmax=lim, cmap="RdBu_r"),
              "mask": dict(vmin=0, vmax=1, cmap="gray")}
    for r, (label, fields) in enumerate(rows.items()):
        for j, (s, f) in enumerate(zip(steps, fields)):
            ax = axes[r][j]
            im = ax.imshow(f, **scales[label])
            if r == 0:
                ax.set_title(f"k={s}", fontsize=8)
            if label == "tau_cond - tau":  # a TPM's deviation is one number per step: print it
                ax.set_xlabel(f"mean {float(f.mean()):+.3f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])  # keep the frame: an all-ones mask is white on white
        axes[r][0].text(-0.1, 0.5, label.replace("tau", "\u03c4"), transform=axes[r][0].transAxes, ha="right",
                        va="center", fontsize=8)
        if label != "mask":
            fig.colorbar(im, ax=axes[r].tolist(), fraction=0.02)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)


CHAR_W, LINE_H = 6, 11  # PIL's default bitmap font: pixels per character, per line


def wrap_label(text: str, width: int) -> list[str]:
    """``text`` broken into lines that fit ``width`` pixels of PIL's default font (long words are cut)."""
    import textwrap

    return textwrap.wrap(str(text), max(1, width // CHAR_W), break_long_words=True) or [""]


def image_grid(images, cols: int | None = None, rows: int | None = None, *, pad: int = 0, labels_left=None,
               labels_top=None, cell: int | None = None):
    """Tile equally sized PIL images (row-major) into one PIL image on white.

    ``cols`` defaults to about the square root of the count, ``rows`` to what the images fill;
    ``pad`` pixels of white around and between cells; optional row labels (left) and column labels
    (above, wrapped to the column's width, e.g. each column's prompt); ``cell`` resizes every image
    to a square of that side (nearest neighbour, so pixels stay sharp).
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
    pad_left = 0 if not labels_left else 8 + CHAR_W * max(len(str(s)) for s in labels_left)
    top = [wrap_label(s, w + pad - 2) for s in labels_top or []]
    pad_top = 0 if not top else 4 + LINE_H * max(len(lines) for lines in top)
    grid = Image.new("RGB", (pad_left + cols * (w + pad) + pad, pad_top + rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (pad_left + pad + c * (w + pad), pad_top + pad + r * (h + pad)))
    for r, s in enumerate(labels_left or []):
        draw.text((2, pad_top + pad + r * (h + pad) + h // 2 - 5), str(s), fill="black")
    for c, lines in enumerate(top):
        for n, line in enumerate(lines):
            draw.text((pad_left + pad + c * (w + pad) + 2, 1 + LINE_H * n), line, fill="black")
    return grid


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().byte().cpu().numpy()
