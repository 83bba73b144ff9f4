"""A per-patch uncertainty head on a frozen backbone (AsyncPatch §5.5).

The head predicts, for every token, how wrong the current clean estimate still is: the log of
the mean squared difference (over channels) between the step's x0 estimate and the latents the
trajectory finally reaches. It is trained by regression on the backbone's own trajectories
(:func:`collect_trajectories`, :func:`fit`; the recipe is ``recipes/train_uncertainty.py``).

Inputs are the features every adapter exposes per token, not transformer internals, so one head
class serves Flux, SD3 / SD3.5 and the testbed models alike: the x0 estimate and the velocity of
the last backbone call (C_tok channels each) and the time the call was conditioned on (one
channel), laid out on the token grid. A small conv net (3x3 kernels) gives each token a view of
its neighbours. A head is tied to a backbone's token width C_tok and records the pipeline class
it was trained on; using it on another backbone fails with a message naming both.

Saved like a policy, with the same helpers (:mod:`tpm.io`): ``config.json`` + ``model.safetensors``.
Written by hand because it is a ten-line network; diffusers' ``ModelMixin`` would add a dependency
on its config machinery for nothing the policy format does not already give.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn

from tpm.io import read_config_and_weights, write_config_and_weights
from tpm.policy import Policy, PolicyError

HEAD_KIND = "uncertainty_head"
LOG_EPS = 1e-6  # floor of the regression target's error before the log


@dataclass
class UncertaintyHeadConfig:
    token_channels: int  # C_tok of the backbone's latent tokens (Flux tiny: 4, FLUX.1: 64, SD3: 64)
    hidden: int = 32  # conv channels
    layers: int = 2  # 3x3 conv layers before the 1x1 output
    backbone: str = ""  # pipeline class the head was trained on (for error messages)

    def __post_init__(self):
        if self.token_channels < 1 or self.hidden < 1 or self.layers < 1:
            raise PolicyError("token_channels, hidden and layers must be >= 1")


class UncertaintyHead(nn.Module):
    """(x0, velocity, tau) per token -> predicted log squared error of x0, (B, h, w)."""

    def __init__(self, config: UncertaintyHeadConfig | None = None, **kwargs):
        super().__init__()
        self.config = config or UncertaintyHeadConfig(**kwargs)
        c = self.config
        mods: list[nn.Module] = []
        width = 2 * c.token_channels + 1
        for _ in range(c.layers):
            # Replicate padding: border tokens are ordinary image tokens, not next to zeros.
            mods += [nn.Conv2d(width, c.hidden, 3, padding=1, padding_mode="replicate"), nn.SiLU()]
            width = c.hidden
        mods.append(nn.Conv2d(width, 1, 1))
        self.net = nn.Sequential(*mods)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.shape[-1] != self.config.token_channels:
            raise PolicyError(
                f"this uncertainty head was trained for latent tokens with {self.config.token_channels} channels "
                f"({self.config.backbone or 'unknown backbone'}), but the pipeline's tokens have {tokens.shape[-1]}; "
                "train a head for this backbone with recipes/train_uncertainty.py"
            )

    def forward(self, x0: torch.Tensor, velocity: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """x0, velocity: (B, N, C_tok) tokens; tau: (B, h, w) conditioning time. Returns (B, h, w)."""
        self.check_tokens(x0)
        b, (h, w) = x0.shape[0], tau.shape[1:]
        feats = torch.cat([x0, velocity], dim=-1).transpose(1, 2).reshape(b, -1, h, w)
        p = next(self.parameters())
        feats = torch.cat([feats, tau[:, None]], dim=1).to(p.device, p.dtype)
        return self.net(feats)[:, 0]

    # --- persistence (the policy directory format, tpm.io) --------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        write_config_and_weights(path, {"kind": HEAD_KIND, **dataclasses.asdict(self.config)}, self)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> UncertaintyHead:
        def build(cfg: dict) -> UncertaintyHead:
            cfg = dict(cfg)
            kind = cfg.pop("kind")
            if kind != HEAD_KIND:
                raise PolicyError(f"{path} does not hold an uncertainty head (its config.json says kind={kind!r})")
            names = {f.name for f in dataclasses.fields(UncertaintyHeadConfig)}
            unknown = sorted(set(cfg) - names)
            if unknown:
                raise PolicyError(f"uncertainty head config has unknown keys {unknown}; valid keys are {sorted(names)}")
            return cls(UncertaintyHeadConfig(**cfg))

        return read_config_and_weights(path, build, key="kind", kind="uncertainty head",
                                       hint="train one with recipes/train_uncertainty.py", error=PolicyError)


def error_target(x0: torch.Tensor, final: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Regression target: log of the per-token mean squared error of x0 vs the final latents, (B, h, w)."""
    err = (x0.float() - final.float()).pow(2).mean(-1)
    return torch.log(err + LOG_EPS).reshape(x0.shape[0], *grid)


@torch.no_grad()
def collect_trajectories(pipe, prompts: list[str], num_steps: int, policy: Policy | None = None,
                         generator: torch.Generator | None = None, **sample_kwargs) -> dict[str, torch.Tensor]:
    """Run the frozen backbone and return a regression set for the head.

    Returns ``x0``, ``velocity`` (n, N, C_tok), ``tau`` (n, h, w) and ``target`` (n, h, w), one
    row per (sample, step) whose outputs a later step sees (steps 0..K-2 of each trajectory: the
    head reads, at step k, what step k-1 produced).
    """
    from tpm.backbones import get_backbone
    from tpm.sampler import StepOutput, sample

    records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(out: StepOutput) -> None:
        if out.step < out.state.num_steps - 1:
            records.append((out.x0.cpu(), out.velocity.cpu(), out.tau_cond.cpu()))

    out = sample(pipe, prompts, policy=policy, num_inference_steps=num_steps, generator=generator,
                 output_type="latent", callback=record, **sample_kwargs)
    if not records:
        raise PolicyError("collect_trajectories needs num_steps >= 2 (step k sees the outputs of step k-1)")
    final = get_backbone(pipe).to_tokens(out.images).cpu()
    grid = tuple(records[0][2].shape[1:])
    return {
        "x0": torch.cat([r[0] for r in records]),
        "velocity": torch.cat([r[1] for r in records]),
        "tau": torch.cat([r[2] for r in records]),
        "target": torch.cat([error_target(r[0], final, grid) for r in records]),
    }


def merge(sets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([s[k] for s in sets]) for k in sets[0]}


def head_loss(head: UncertaintyHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of the predicted log error (the regression the head is trained by)."""
    pred = head(batch["x0"], batch["velocity"], batch["tau"])
    return (pred - batch["target"].to(pred.device, pred.dtype)).pow(2).mean()


def fit(head: UncertaintyHead, data: dict[str, torch.Tensor], steps: int = 200, lr: float = 3e-3,
        batch_size: int = 64, seed: int = 0, callback=None, accelerator=None) -> list[float]:
    """AdamW regression of the head on ``data``; returns the loss per step.

    ``callback(step, loss)`` runs after each step (the recipe logs there); with an ``accelerate``
    ``Accelerator`` the head and optimiser are prepared by it and the backward goes through it.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # start from the mean target: the log errors sit far from 0
        head.net[-1].bias.fill_(float(data["target"].mean()))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    model = head
    if accelerator is not None:
        model, opt = accelerator.prepare(head, opt)
    n = data["x0"].shape[0]
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=gen)
        batch = {k: v[idx] for k, v in data.items()}
        pred = model(batch["x0"], batch["velocity"], batch["tau"])
        loss = (pred - batch["target"].to(pred.device, pred.dtype)).pow(2).mean()
        opt.zero_grad()
        loss.backward() if accelerator is None else accelerator.backward(loss)
        opt.step()
        losses.append(loss.detach().item())
        if callback is not None:
            callback(step, losses[-1])
    head.eval()
    return losses


def plot_maps(head: UncertaintyHead, data: dict[str, torch.Tensor], path: str, rows: int = 4) -> str:
    """PNG: true vs predicted log-error maps for a few validation rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = torch.linspace(0, data["x0"].shape[0] - 1, rows).long()
    with torch.no_grad():
        pred = head(data["x0"][idx], data["velocity"][idx], data["tau"][idx])
    fig, axes = plt.subplots(rows, 2, figsize=(4, 2 * rows), squeeze=False)
    for r in range(rows):
        t = data["target"][idx[r]]
        lo, hi = float(t.min()), float(t.max())
        axes[r, 0].imshow(t, vmin=lo, vmax=hi)
        axes[r, 1].imshow(pred[r], vmin=lo, vmax=hi)
        axes[r, 0].set_ylabel(f"tau~{float(data['tau'][idx[r]].mean()):.2f}", fontsize=7)
    axes[0, 0].set_title("log error", fontsize=8)
    axes[0, 1].set_title("head", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
