"""PNG figures of a comparison: the image grid, reward against steps, time-field heatmaps."""

from __future__ import annotations

import os

import torch

from tpm.comparison.report import PolicySummary


def write_grid(path: str, out: str, rows: list[dict], policies: list[str], steps: int, seed: int,
               max_prompts: int = 8, cell: int = 96) -> str:
    """Policies in rows, prompts in columns with each prompt's text above its column, all from seed
    ``seed`` (the same noise down a column)."""
    from PIL import Image

    from tpm.plots import image_grid

    table = {(r["policy"], r["prompt_index"]): r for r in rows if r["steps"] == steps and r["seed"] == seed}
    indices = sorted({i for (_, i) in table})[:max_prompts]
    images = []
    for p in policies:
        for i in indices:
            with Image.open(os.path.join(out, table[(p, i)]["image"])) as im:
                images.append(im.convert("RGB"))
    grid = image_grid(images, rows=len(policies), cols=len(indices), labels_left=list(policies),
                      labels_top=[table[(policies[0], i)]["prompt"] for i in indices], cell=cell)
    grid.save(path)
    return path


def write_reward_vs_steps(path: str, summary: list[PolicySummary], metrics: list[str]) -> str:
    """One panel per metric: mean and 95 % interval against the number of steps, a line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(s.policy for s in summary))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for p in policies:
            pts = sorted((s.steps, s.means[m]) for s in summary if s.policy == p)
            ks = [k for k, _ in pts]
            ax.plot(ks, [iv.estimate for _, iv in pts], marker="o", label=p)
            ax.fill_between(ks, [iv.low for _, iv in pts], [iv.high for _, iv in pts], alpha=0.2)
        ax.set_xlabel("steps")
        ax.set_ylabel(m)
        ax.set_xticks(sorted({s.steps for s in summary}))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_fields(path: str):
    """A :class:`tpm.sampler.Trajectory` with the saved fields of one image (batch of 1)."""
    from safetensors.torch import load_file

    from tpm.sampler import Trajectory

    t = load_file(path)
    tau = t["tau"]
    masks = t.get("masks")
    traj = Trajectory(sigmas=t["sigmas"], grid=tuple(tau.shape[1:]))
    traj.tau = [f[None] for f in tau]
    traj.tau_cond = [f[None] for f in t["tau_cond"]]
    traj.masks = ([None] * len(traj.tau_cond) if masks is None
                  else [None if torch.isnan(m).all() else m[None] for m in masks])
    return traj


def is_asynchronous(traj, atol: float = 1e-6) -> bool:
    """Whether any step's update or conditioning field differs across tokens."""
    fields = [*traj.tau, *traj.tau_cond]
    return any(float(f.max() - f.min()) > atol for f in fields)


def departs_from_synchronous(traj, atol: float = 1e-6) -> bool:
    """Whether a field differs across tokens, or the denoiser was told another time than the latent's
    (``tau_cond != tau``, e.g. AsyncDiff's TPM, whose fields are uniform per step)."""
    from tpm.plots import conditioning_shift

    return is_asynchronous(traj, atol) or conditioning_shift(traj) > atol


def write_field_heatmap(path: str, fields_file: str, max_steps: int = 12) -> str | None:
    """``tpm.plots.field_strip`` of a saved field (tau, and tau_cond - tau when the policy set it),
    or None when the policy did exactly what the synchronous sampler does."""
    from tpm.plots import field_strip

    traj = load_fields(fields_file)
    if not departs_from_synchronous(traj):
        return None
    return field_strip(traj, path, sample=0, max_steps=max_steps)
