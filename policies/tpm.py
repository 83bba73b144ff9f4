"""AsyncDiff's Timestep Prediction Module (TPM): a learned pseudo-timestep for the denoiser.

AsyncDiff §3.2 keeps the image update on the synchronous grid and only changes the time the
denoiser is *told* (asynchronous inference). At step k the latent sits at ``t_k`` and the
backbone is queried at the pseudo-timestep (Eq. 6)

    t*_k = t_{k-1} + (0.5 + r_k) * dt_{k-1},   dt_{k-1} = t_k - t_{k-1},   r_k ~ Beta(alpha, beta)

so ``r = 0.5`` is the synchronous sampler, ``r -> 0`` conditions half a step noisier and
``r -> 1`` half a step cleaner. ``(alpha, beta) = phi(TPM(...))`` with phi of Eq. 17, which keeps
both above 1 (a uni-modal Beta). At evaluation ``r`` is the Beta's mode (Eq. 18). Deployment
knobs: the deviation ``D = r - 0.5`` scaled by ``gamma`` (Eq. 12) and the lifted bound
``eta = 2 r`` (Eq. 13; a training-time choice). Algorithm 2 starts at ``t*_0 = t_0`` and caps
the pseudo-timestep below at ``sigma_min``; its last Euler step to t = 0 is our grid's last step.

Mapping onto ``tpm.sample``: our policy acts *before* the backbone call of step k and sees the
previous call's velocity and x0, exactly the inputs Algorithm 2 gives the TPM at the end of its
iteration k-1. So at step k (latent at ``sigmas[k]``) we return
``tau_cond = tau_{k-1} + eta * (tau_k - tau_{k-1})`` per token, with ``tau_{k-1}`` the previous
update field (``sigmas[k-1]`` on the synchronous grid); at k = 0 no action is taken
(``tau_cond = tau_0``, no log-probability). ``tau_next`` stays the synchronous grid. The TPM
reads the current latent x_k instead of Eq. 7's x_{k-1}: x_k = x_{k-1} + dt * v_{k-1} is a fixed
function of the inputs it already gets, and it is what the sampler holds.

The network (AsyncDiff §3.3, "token-centric"): the latent, the last velocity and the x0 estimate
(zeros at k = 0) are concatenated per token, average-pooled onto a fixed ``image_grid`` x
``image_grid`` patch grid and projected to ``width`` (pooling before the linear projection is
the same as after it, and it makes the stored replay inputs small); text-condition tokens are the
prompt embedding sequence pooled to ``text_tokens`` tokens plus the pooled embedding; one temporal
token encodes (k / K, tau_k, previous tau_cond, |dt|). A shallow pre-activation transformer
encoder (no dropout and, as in the paper, no layer norm by default) reads them with
``readout_tokens`` learned global tokens, whose outputs are flattened into a small MLP emitting
two scalars. We write the encoder block by hand because ``nn.TransformerEncoderLayer`` always
carries LayerNorm modules that its fused eval-mode path relies on.

Training (GRPO, ``tpm.grpo``): each decision stores in ``Action.extras`` exactly the network's
inputs ("image", "temporal", and the per-trajectory "text", "pooled") and the sampled "r", so
:meth:`TPM.log_prob` recomputes the log-probability without the backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from policies.layers import Block, encode_sequence, pool_text, read_state
from tpm.distributions import BetaActions
from tpm.fields import synchronous_next
from tpm.policy import Action, Policy, PolicyError, State, TrainablePolicy, register_policy


# ---- the maths of the paper, as pure functions -----------------------------------------------
def phi(x: torch.Tensor) -> torch.Tensor:
    """AsyncDiff Eq. 17: ``2 + x + x^2/2`` for x > 0, ``1 + exp(x)`` otherwise (> 1, C1 at 0).

    x is floored at -12 in the exponential: in float32 ``1 + exp(x)`` rounds to exactly 1 below about
    -17, which would make Beta(1, 1)'s mode 0/0; exp(-12) ~ 6e-6 keeps alpha, beta strictly above 1.
    """
    return torch.where(x > 0, 2 + x + 0.5 * x * x, 1 + torch.exp(torch.clamp(x, min=-12.0, max=0.0)))


def deviation_factor(r: torch.Tensor, gamma: float = 1.0, lifted_bound: bool = False) -> torch.Tensor:
    """eta, the multiple of dt the pseudo-timestep moves from ``t_{k-1}``.

    Eq. 10 ``eta = 0.5 + r`` (deviation D = r - 0.5 in [-0.5, 0.5]), scaled by ``gamma`` as in
    Eq. 12 (``eta = 1 + gamma * D``); with ``lifted_bound`` the deviation is doubled first
    (Eq. 13, ``eta = 2 r`` at gamma = 1).
    """
    bound = 2.0 if lifted_bound else 1.0
    return 1 + bound * gamma * (r - 0.5)


def pseudo_timestep(prev_tau: torch.Tensor, tau: torch.Tensor, eta: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """AsyncDiff Eq. 6 with Algorithm 2's cap: ``max(sigma_min, t_{k-1} + eta * (t_k - t_{k-1}))``.

    ``prev_tau``/``tau``: (B, h, w) update fields of steps k-1 and k; ``eta``: (B,). The result is
    also kept <= 1 (a time field lives in [0, 1]).
    """
    eta = eta.to(tau.dtype).view(-1, *([1] * (tau.ndim - 1)))
    return (prev_tau + eta * (tau - prev_tau)).clamp(min=sigma_min, max=1.0)


# ---- the network ------------------------------------------------------------------------------
@dataclass
class TPMConfig:
    """Constructor arguments of :class:`TPM` (saved as its ``config.json``).

    token_dim: channels per backbone token C_tok (Flux: transformer in_channels, 64; SD3: 16 * 2 * 2).
    text_dim / pooled_dim: widths of the prompt embedding sequence and of the pooled embedding
    (Flux.1: 4096 / 768; SD3.5: 4096 / 2048). ``TPM.for_pipeline(pipe)`` reads all three.
    width, layers, heads, mlp_ratio: the encoder. image_grid: side of the pooled patch grid.
    text_tokens: text-condition tokens pooled from the embedding sequence. readout_tokens: learned
    global tokens fed to the read-out MLP. layer_norm: pre-norm LayerNorm in the blocks (off in the
    paper). gamma: deviation scale (Eq. 12). lifted_bound: eta = 2r (Eq. 13). sigma_min: lower cap of
    the pseudo-timestep (Algorithm 2). init_scale: std of the read-out's last layer at init, small so
    that a new policy starts near the synchronous sampler (alpha = beta = 2, mode 0.5).
    deterministic: the action when not exploring: "mode" (Eq. 18, the paper) or "mean"
    (alpha / (alpha + beta)). GRPO maximises the reward *expected under sampling*, i.e. around the
    mean; a flat Beta's mode lies much further out (Beta(4, 1.3): mean 0.75, mode 0.91).
    """

    token_dim: int = 64
    text_dim: int = 4096
    pooled_dim: int = 768
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    image_grid: int = 8
    text_tokens: int = 4
    readout_tokens: int = 2
    layer_norm: bool = False
    gamma: float = 1.0
    lifted_bound: bool = False
    sigma_min: float = 1e-3
    init_scale: float = 0.01
    deterministic: str = "mode"

    def __post_init__(self):
        positive = ("token_dim", "text_dim", "pooled_dim", "width", "layers", "heads", "mlp_ratio",
                    "image_grid", "text_tokens", "readout_tokens")
        bad = [n for n in positive if int(getattr(self, n)) < 1]
        if bad:
            raise PolicyError(f"TPM config: {bad} must be >= 1")
        if self.width % self.heads:
            raise PolicyError(f"TPM config: width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0 <= self.sigma_min < 1:
            raise PolicyError(f"TPM config: sigma_min must lie in [0, 1), got {self.sigma_min}")
        if not math.isfinite(self.gamma) or self.gamma < 0:
            raise PolicyError(f"TPM config: gamma must be a finite number >= 0, got {self.gamma}")
        if self.deterministic not in ("mode", "mean"):
            raise PolicyError(f"TPM config: deterministic must be 'mode' or 'mean', got {self.deterministic!r}")


class TPMNetwork(nn.Module):
    """Inputs -> (alpha, beta). Shared by :class:`TPM` and ``policies.VelocityScale``.

    Inputs (the replay record): image (B, 3*C_tok, g, g), temporal (B, 4), text (B, text_tokens,
    text_dim), pooled (B, pooled_dim); all float32.
    """

    NUM_TEMPORAL = 4

    def __init__(self, cfg: TPMConfig):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.image_in = nn.Linear(3 * cfg.token_dim, w)
        self.image_pos = nn.Parameter(torch.randn(cfg.image_grid * cfg.image_grid, w) * 0.02)
        self.text_in = nn.Linear(cfg.text_dim, w)
        self.text_pos = nn.Parameter(torch.randn(cfg.text_tokens, w) * 0.02)
        self.pooled_in = nn.Linear(cfg.pooled_dim, w)
        self.temporal_in = nn.Sequential(nn.Linear(self.NUM_TEMPORAL * 17, w), nn.GELU(), nn.Linear(w, w))
        self.readout = nn.Parameter(torch.randn(cfg.readout_tokens, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio, cfg.layer_norm) for _ in range(cfg.layers))
        self.head = nn.Sequential(nn.Linear(cfg.readout_tokens * w, w), nn.GELU(), nn.Linear(w, 2))
        nn.init.normal_(self.head[-1].weight, std=cfg.init_scale)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        dev, dt = self.readout.device, self.readout.dtype
        img = inputs["image"].to(dev, dt).flatten(2).transpose(1, 2)  # (B, g*g, 3C)
        tokens = encode_sequence(self, inputs, self.image_in(img) + self.image_pos)
        ab = self.head(tokens[:, : self.cfg.readout_tokens].flatten(1))
        return phi(ab[:, 0]), phi(ab[:, 1])


def network_inputs(state: State, cfg: TPMConfig, prev_cond: torch.Tensor | None,
                   prev_tau: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The TPM's inputs at ``state``, pooled and detached (this is what GRPO stores per step)."""
    lat, vel, x0, emb = read_state(state, cfg, "this TPM", "build it with TPM.for_pipeline(pipe) or load a "
                                   "policy trained for this backbone")
    bsz, n, c = lat.shape
    h, w = state.grid
    feats = torch.cat([lat, vel, x0], dim=-1).transpose(1, 2).reshape(bsz, 3 * c, h, w)
    image = F.adaptive_avg_pool2d(feats, cfg.image_grid)
    text = pool_text(emb, cfg.text_tokens)
    tau = state.tau.detach().float().flatten(1).mean(1)
    prev_c = tau if prev_cond is None else prev_cond.detach().float().flatten(1).mean(1)
    prev_t = tau if prev_tau is None else prev_tau.detach().float().flatten(1).mean(1)
    step = torch.full_like(tau, state.step / max(state.num_steps, 1))
    temporal = torch.stack([step, tau, prev_c, (prev_t - tau).abs()], dim=1)
    return {"image": image.contiguous(), "temporal": temporal, "text": text,
            "pooled": state.pooled.detach().float().clone()}


def dims_for_pipeline(pipe) -> dict[str, int]:
    """token_dim, text_dim, pooled_dim of a pipeline's backbone (its adapter reads them from the model config)."""
    from tpm.backbones import get_backbone

    backbone = get_backbone(pipe)
    try:
        return {"token_dim": backbone.token_dim, "text_dim": backbone.text_dim, "pooled_dim": backbone.pooled_dim}
    except AttributeError as e:
        raise PolicyError(f"cannot read the policy's input sizes from {type(pipe).__name__} ({e}); "
                          "pass token_dim, text_dim and pooled_dim explicitly") from None


class BetaPolicy(TrainablePolicy):
    """What the TPM and the velocity-scale policy share: a :class:`TPMNetwork` giving Beta(alpha, beta)
    over one scalar ``r`` per sample, trained through the :class:`~tpm.policy.TrainablePolicy`
    contract. Not exploring, ``r`` is the mode (Eq. 18), or the mean when ``config.deterministic``
    is ``"mean"``.
    """

    config_class = TPMConfig
    static_inputs = ("text", "pooled")  # the prompt's embeddings: the same at every step of a run

    def __init__(self, config: TPMConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.net = TPMNetwork(self.config)

    @classmethod
    def for_pipeline(cls, pipe, **options) -> BetaPolicy:
        """Build with the token/text widths of ``pipe``'s backbone (other options as in TPMConfig)."""
        return cls(**{**dims_for_pipeline(pipe), **options})

    def distribution(self, inputs: dict[str, torch.Tensor]) -> BetaActions:
        alpha, beta = self.net(inputs)
        return BetaActions({"r": alpha}, {"r": beta})

    def decision_stats(self, actions: dict[str, torch.Tensor]) -> dict[str, float]:
        """The deviation D = r - 0.5 (Eq. 10): 0 is the synchronous sampler."""
        d = actions["r"].float().flatten() - 0.5
        return {"deviation/mean": float(d.mean()), "deviation/std": float(d.std(unbiased=False)),
                "deviation/min": float(d.min()), "deviation/max": float(d.max())}


@register_policy("tpm")
class TPM(BetaPolicy):
    """AsyncDiff's asynchronous inference (Eq. 6-18, Algorithm 2): see the module docstring."""

    paper = ("AsyncDiff: Asynchronous Timestep Conditioning for Enhanced Text-to-Image Diffusion Inference "
             "(Timestep Prediction Module, Eq. 6-7, 12-13, 17-18; trained with GRPO, Eq. 14-16)")

    def act(self, state: State) -> Action:
        cfg = self.config
        memory = state.memory
        tau_next = synchronous_next(state)
        prev_tau, prev_cond = memory.get("prev_tau"), memory.get("prev_cond")
        if state.step == 0 or prev_tau is None:
            # Algorithm 2, line 2: t*_0 = t_0; nothing is sampled.
            tau_cond = state.tau.clone()
            action = Action(tau_next=tau_next, tau_cond=tau_cond)
        else:
            decision = self.decide(network_inputs(state, cfg, prev_cond, prev_tau))
            eta = deviation_factor(decision.action["r"], cfg.gamma, cfg.lifted_bound)
            tau_cond = pseudo_timestep(prev_tau.to(state.tau.device), state.tau, eta, cfg.sigma_min)
            action = Action(tau_next=tau_next, tau_cond=tau_cond.to(state.tau.dtype), log_prob=decision.log_prob,
                            extras=decision.record)
        memory["prev_tau"] = state.tau.detach()
        memory["prev_cond"] = action.tau_cond.detach()
        return action


@dataclass
class ConstantDeviationConfig:
    r: float = 0.5  # the fixed action in (0, 1); 0.5 is the synchronous sampler
    gamma: float = 1.0
    lifted_bound: bool = False
    sigma_min: float = 1e-3

    def __post_init__(self):
        if not 0 < self.r < 1:
            raise PolicyError(f"constant_deviation: r must lie in (0, 1), got {self.r}")


@register_policy("constant_deviation")
class ConstantDeviation(Policy):
    """The TPM's action with one fixed r at every step (Eq. 6; Algorithm 2 keeps t*_0 = t_0).

    The fixed family a TPM has to beat: if the same r for every prompt and state were as good as
    the trained network, the network learned nothing a constant could not.
    """

    paper = "AsyncDiff: Asynchronous Timestep Conditioning for Enhanced Text-to-Image Diffusion Inference (the TPM's action with a fixed r, Eq. 6)"

    config_class = ConstantDeviationConfig

    def act(self, state: State) -> Action:
        cfg = self.config
        prev = state.memory.get("prev_tau")
        state.memory["prev_tau"] = state.tau
        if prev is None:
            return Action(tau_next=synchronous_next(state))
        eta = deviation_factor(torch.full((state.batch_size,), cfg.r), cfg.gamma, cfg.lifted_bound)
        return Action(tau_next=synchronous_next(state), tau_cond=pseudo_timestep(prev, state.tau, eta, cfg.sigma_min))
