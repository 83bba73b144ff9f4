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

Saved like a policy: ``config.json`` + ``model.safetensors``. Written by hand because it is a
ten-line network; diffusers' ``ModelMixin`` would add a dependency on its config machinery for
nothing the policy format does not already give.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from tpm.policy import CONFIG_NAME, WEIGHTS_NAME, Policy, PolicyError, State

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

    # --- persistence (same layout as a policy directory) ---------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump({"kind": HEAD_KIND, **dataclasses.asdict(self.config)}, f, indent=2, sort_keys=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  os.path.join(path, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> UncertaintyHead:
        from safetensors.torch import load_file

        cfg_path, weights = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
        if not (os.path.isfile(cfg_path) and os.path.isfile(weights)):
            raise PolicyError(f"{path} is not a saved uncertainty head (needs {CONFIG_NAME} and {WEIGHTS_NAME}; "
                              "train one with recipes/train_uncertainty.py)")
        with open(cfg_path) as f:
            cfg = json.load(f)
        if cfg.pop("kind", None) != HEAD_KIND:
            raise PolicyError(f"{cfg_path} does not describe an uncertainty head")
        head = cls(UncertaintyHeadConfig(**cfg))
        loaded = load_file(weights)
        expected = head.state_dict()
        bad = sorted(k for k in expected if k not in loaded or loaded[k].shape != expected[k].shape)
        if bad:
            raise PolicyError(f"{weights} does not match its config.json (tensors {bad}); re-export the head")
        head.load_state_dict(loaded)
        return head.eval()


def error_target(x0: torch.Tensor, final: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Regression target: log of the per-token mean squared error of x0 vs the final latents, (B, h, w)."""
    err = (x0.float() - final.float()).pow(2).mean(-1)
    return torch.log(err + LOG_EPS).reshape(x0.shape[0], *grid)


class _Recorder(Policy):
    """Wraps a policy and records the features each step sees (the previous call's outputs)."""

    config_class = dict

    def __init__(self, inner: Policy):
        super().__init__(config={})
        self.inner = inner
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def begin(self, ctx):
        self.records = []
        return self.inner.begin(ctx)

    def known_region(self):
        return self.inner.known_region()

    def act(self, state: State):
        if state.x0 is not None:
            self.records.append((state.x0.cpu(), state.velocity.cpu(), state.memory["_rec_tau_cond"].cpu()))
        action = self.inner.act(state)
        state.memory["_rec_tau_cond"] = state.tau if action.tau_cond is None else action.tau_cond
        return action


@torch.no_grad()
def collect_trajectories(pipe, prompts: list[str], num_steps: int, policy: Policy | None = None,
                         generator: torch.Generator | None = None, **sample_kwargs) -> dict[str, torch.Tensor]:
    """Run the frozen backbone and return a regression set for the head.

    Returns ``x0``, ``velocity`` (n, N, C_tok), ``tau`` (n, h, w) and ``target`` (n, h, w), one
    row per (sample, step) with a previous call (steps 1..K-1 of each trajectory).
    """
    import tpm
    from policies.synchronous import Synchronous
    from tpm.backbones import get_backbone

    rec = _Recorder(policy if policy is not None else Synchronous())
    out = tpm.sample(pipe, prompts, policy=rec, num_inference_steps=num_steps, generator=generator,
                     output_type="latent", **sample_kwargs)
    if not rec.records:
        raise PolicyError("collect_trajectories needs num_steps >= 2 (step k sees the outputs of step k-1)")
    final = get_backbone(pipe).to_tokens(out.images).cpu()
    grid = tuple(rec.records[0][2].shape[1:])
    x0 = torch.cat([r[0] for r in rec.records])
    return {
        "x0": x0,
        "velocity": torch.cat([r[1] for r in rec.records]),
        "tau": torch.cat([r[2] for r in rec.records]),
        "target": torch.cat([error_target(r[0], final, grid) for r in rec.records]),
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


@dataclass
class TrainUncertaintyConfig:
    """``recipes/train_uncertainty.py`` options (one sentence each)."""

    model: str = ""  # pipeline: testbed:NAME, tiny:flux|sd3, a local path or hub id; "" = the testbed if shipped
    output_dir: str = "outputs/uncertainty-head"  # where the head, logs, report and PNG go
    num_prompts: int = 32  # training prompts (testbed train split, or the tiny vocabulary)
    val_prompts: int = 8  # held-out prompts for the validation loss
    num_steps: int = 8  # denoising steps of each self-generated trajectory
    resolution: int | None = None  # image side in pixels for the trajectories; None = the pipeline's default
    rollout_batch: int = 8  # prompts per sampling call
    trajectory_policies: str = "synchronous,uncertainty"  # comma list: policies whose trajectories are regressed on
    hidden: int = 32  # head conv channels
    layers: int = 2  # head 3x3 conv layers
    train_steps: int = 300  # optimiser steps
    lr: float = 3e-3  # AdamW learning rate
    batch_size: int = 64  # (sample, step) rows per optimiser step
    seed: int = 0  # seeds prompts, noises and minibatches

    def __post_init__(self):
        if self.num_steps < 2:
            raise PolicyError("num_steps must be >= 2: the head regresses step k's view of step k-1's output")
        if min(self.num_prompts, self.val_prompts, self.rollout_batch, self.train_steps) < 1:
            raise PolicyError("num_prompts, val_prompts, rollout_batch and train_steps must be >= 1")


def _prompts(pipe, n: int, split: str, seed: int) -> list[str]:
    if getattr(pipe, "tpm_testbed_config", None) is not None:
        from tpm.testbed import sample_prompts

        return [item.prompt for item in sample_prompts(n, split=split, seed=seed)]
    # Words the tiny random pipelines' tokenizer knows (tpm.testing.WORDS).
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "pink"]
    shapes = ["circle", "square", "triangle", "shark", "dog", "cat", "car", "tree"]
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
    return [f"a {colors[int(torch.randint(len(colors), (1,), generator=g))]} "
            f"{shapes[int(torch.randint(len(shapes), (1,), generator=g))]}" for _ in range(n)]


def _call_kwargs(pipe) -> dict:
    if getattr(pipe, "tpm_testbed_config", None) is not None:
        from tpm.testbed.models import call_kwargs

        kw = call_kwargs(pipe)
        kw.pop("num_inference_steps", None)
        return kw
    return {}


def train_uncertainty(cfg: TrainUncertaintyConfig, pipe=None) -> dict:
    """Collect trajectories, fit the head, save it, log to tensorboard, write a PNG; return a report."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    import policies
    from tpm.backbones import get_backbone

    os.makedirs(cfg.output_dir, exist_ok=True)
    acc = Accelerator(log_with="tensorboard", project_dir=cfg.output_dir, cpu=not torch.cuda.is_available())
    acc.init_trackers("uncertainty_head", config={k: v for k, v in dataclasses.asdict(cfg).items()})
    if pipe is None:
        from tpm.cli import _default_model, load_model

        pipe = load_model(cfg.model or _default_model(), device=str(acc.device))
    kw = _call_kwargs(pipe)
    if cfg.resolution is not None:
        kw.update(height=cfg.resolution, width=cfg.resolution)
    names = [n.strip() for n in cfg.trajectory_policies.split(",") if n.strip()]

    def collect(prompts: list[str], seed: int) -> dict[str, torch.Tensor]:
        sets = []
        chunks = [prompts[i:i + cfg.rollout_batch] for i in range(0, len(prompts), cfg.rollout_batch)]
        for j, (name, chunk) in enumerate(tqdm([(n, c) for n in names for c in chunks], desc="trajectories")):
            gen = torch.Generator().manual_seed(seed + j)
            sets.append(collect_trajectories(pipe, chunk, cfg.num_steps, policies.load(name), gen, **kw))
        return merge(sets)

    train = collect(_prompts(pipe, cfg.num_prompts, "train", cfg.seed), cfg.seed)
    val = collect(_prompts(pipe, cfg.val_prompts, "val", cfg.seed), cfg.seed + 10_000)
    c_tok = train["x0"].shape[-1]
    torch.manual_seed(cfg.seed)
    head = UncertaintyHead(token_channels=c_tok, hidden=cfg.hidden, layers=cfg.layers,
                           backbone=type(pipe).__name__)
    with torch.no_grad():
        val_before = float(head_loss(head, val))
    bar = tqdm(total=cfg.train_steps, desc="head")

    def log(step: int, loss: float):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        acc.log({"train/loss": loss}, step=step)

    losses = fit(head.to(acc.device), train, cfg.train_steps, cfg.lr, cfg.batch_size, cfg.seed, log, acc)
    bar.close()
    head = acc.unwrap_model(head).cpu().eval()
    with torch.no_grad():
        val_after = float(head_loss(head, val))
        # Baseline: one constant per time (the mean training target), i.e. what a map without
        # spatial information could do at best among constants.
        const = float(((val["target"] - train["target"].mean()) ** 2).mean())
    acc.log({"val/loss": val_after}, step=cfg.train_steps)
    acc.end_training()
    head_dir = os.path.join(cfg.output_dir, "head")
    head.save_pretrained(head_dir)
    png = plot_maps(head, val, os.path.join(cfg.output_dir, "uncertainty_maps.png"))
    _ = get_backbone(pipe)  # fail here, not at use, if the pipeline has no adapter
    return {"head": head_dir, "png": png, "rows_train": int(train["x0"].shape[0]),
            "rows_val": int(val["x0"].shape[0]), "train_loss_first": losses[0], "train_loss_last": losses[-1],
            "val_loss_untrained": val_before, "val_loss": val_after, "val_loss_constant": const,
            "backbone": type(pipe).__name__, "token_channels": c_tok}


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
