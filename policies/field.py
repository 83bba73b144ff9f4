"""A learned per-token time field, trained with GRPO (AsynDM's first item of future work).

AsynDM moves prompt-related tokens on a slower, fixed concave schedule; AsyncDiff learns the
time the denoiser is *told*; TPDM-style methods learn the grid. This policy learns all three at
once, per step, from the sampler's state. At step k of K each token i sits at ``tau_k[i]``; the
synchronous grid is ``s_0 = 1 > s_1 > ... > s_K = 0``. The action has three parts, each a value
``d`` in (-1, 1) written ``d = 2u - 1`` with ``u ~ Beta`` (:mod:`tpm.distributions`):

1. **grid move** (one per sample): the sample's *centre* ``c_{k+1}``, the time its tokens head for.
   ``c = s_{k+1} + d (c_k - s_{k+1})`` for d >= 0 (a shorter step, down to none) and
   ``c = s_{k+1} + d (s_{k+1} - s_{k+2})`` for d < 0 (a longer one, at most to the grid point
   after next); ``c_0 = 1``. With the other parts off this is a learned per-step grid, all
   tokens equal (``token_offsets=False, learn_cond=False``).
2. **token offsets** (one per token, or per ``patch`` x ``patch`` group of tokens): each token
   leaves its anchor ``a_i = min(c, tau_i)`` towards ``hi_i = min(tau_i, c + delta/2)`` (d > 0,
   slower) or ``lo_i = max(0, c - delta/2)`` (d < 0, faster); ``delta`` is ``max_disparity``.
3. **conditioning shift** (per token or group): ``tau_cond_i = tau_i - d * rho * (tau_i - tau_next_i)``,
   clamped to [sigma_min, 1]: the denoiser is told a time up to ``rho`` (``cond_range``) of this
   step cleaner (d > 0) or noisier (d < 0) than the token's own, AsyncDiff's pseudo-timestep
   (Eq. 6) made per token.

At the last step every token goes to 0 and only the conditioning shift is decided.

Constraints hold for every draw, not only for the mode:

- a token's time never rises: ``tau_next_i <= hi_i <= tau_i``;
- every token is at 0 after the last step;
- disparity: all ``tau_next`` of a sample lie in ``[c - delta/2, c + delta/2]``, so no two tokens
  are more than ``delta`` apart (AsynDM App. D.2: large gaps leave fast regions noisy);
- the interval is never empty: ``tau_i >= c_k - delta/2 >= c_{k+1} - delta/2`` because centres never
  rise, so ``lo_i <= a_i <= hi_i``.

Start. The output heads are zero-initialised, so every Beta has alpha = beta and its mode is
exactly 0.5 (:func:`tpm.distributions.beta_mode`): d = 0, ``c = s_{k+1}``, ``tau_next = s_{k+1}`` and
``tau_cond = tau``, the synchronous sampler bit for bit. :func:`policies.field_imitation.imitate`
can instead warm-start it by imitating a fixed policy (asyndm, dm_concave, uncertainty, a
shifted grid) before GRPO.

Inputs. Per token: the latent, the last velocity and x0 estimate (zeros at k = 0), the log of how
much the x0 estimate moved since the call before (AsyncPatch's training-free uncertainty), the
token's time, and the text->image attention of the prompt's object words (AsynDM Eq. 7's signal,
before its threshold; zeros unless ``use_attention``), projected and added to a learned
embedding of the token position. Global: a temporal token (k / K, c_k, s_{k+1}, s_{k+2}, mean and
spread of tau), the pooled prompt embedding and the prompt sequence pooled to ``text_tokens``.
A shallow transformer (:class:`policies.layers.Block`) reads them with one read-out token that
gives the grid move; each token's output gives its offset and conditioning shift. Position
embeddings tie the policy to the token grid it was built for; another grid raises an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from policies.layers import Block, encode_sequence, pool_text, read_state
from policies.masks import find_objects, object_positions
from policies.tpm import dims_for_pipeline
from tpm.distributions import BetaActions, mode_concentration
from tpm.policy import Action, PolicyError, RunContext, State, TrainablePolicy, register_policy

PARTS = ("grid", "offset", "cond")
NUM_TEMPORAL = 6
TOKEN_EXTRA = 3  # x0 change, time, object attention (+1 with object_order: the first object's share)


@dataclass
class FieldConfig:
    """Constructor arguments of :class:`FieldPolicy` (saved as its ``config.json``).

    token_dim / text_dim / pooled_dim: widths of the backbone's tokens, prompt embedding sequence and
    pooled embedding (``FieldPolicy.for_pipeline`` reads them). grid: the token grid [h, w] the policy
    is built for. patch: tokens per side of one decision group (1 = every token decides). width,
    layers, heads, mlp_ratio, text_tokens: the network. learn_grid / token_offsets / learn_cond:
    which action parts exist. max_disparity: delta, the largest gap between two tokens' times, in
    (0, 1]. cond_range: rho, the largest conditioning shift in units of the step, in [0, 1].
    concentration: kappa of the Beta draws at the start (larger = narrower exploration).
    learn_concentration: whether the network may change kappa (by a factor up to e^3 either way).
    use_attention: read the object words' attention (captures ``attention_layers``, default all).
    object_order: also read, per token, the first-mentioned object word's share of the object words'
    attention (needs ``use_attention``), so the policy can tell which object a token belongs to and
    let one object settle before another (per-object order, AsynDM's second item of future work).
    sigma_min: lower cap of the conditioning time. deterministic: "mode" or "mean" when not exploring.
    time_levels: at most this many distinct conditioning times per sample reach the backbone (finer
    fields are snapped, :mod:`tpm.backbones.modulation`), which bounds the per-token modulation cost
    at large token counts; ``None`` = exact. The default 64 never binds below 65 decision groups.
    """

    token_dim: int = 64
    text_dim: int = 4096
    pooled_dim: int = 768
    grid: list[int] | None = None
    patch: int = 1
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    text_tokens: int = 4
    learn_grid: bool = True
    token_offsets: bool = True
    learn_cond: bool = True
    max_disparity: float = 0.2
    cond_range: float = 0.5
    concentration: float = 16.0
    learn_concentration: bool = False
    use_attention: bool = False
    object_order: bool = False
    attention_layers: list[int] | None = None
    objects: list[str] | None = None
    sigma_min: float = 1e-3
    deterministic: str = "mode"
    time_levels: int | None = 64

    def __post_init__(self):
        positive = ("token_dim", "text_dim", "pooled_dim", "patch", "width", "layers", "heads", "mlp_ratio",
                    "text_tokens")
        bad = [n for n in positive if int(getattr(self, n)) < 1]
        if bad:
            raise PolicyError(f"field policy config: {bad} must be >= 1")
        if self.time_levels is not None and int(self.time_levels) < 2:
            raise PolicyError(f"field policy config: time_levels must be >= 2 or None (exact), got {self.time_levels}")
        if self.grid is None or len(self.grid) != 2 or min(self.grid) < 1:
            raise PolicyError("field policy config: grid must be the token grid [h, w] the policy acts on; "
                              "build it with FieldPolicy.for_pipeline(pipe, height=..., width=...)")
        self.grid = [int(self.grid[0]), int(self.grid[1])]
        if self.grid[0] % self.patch or self.grid[1] % self.patch:
            raise PolicyError(f"field policy config: patch {self.patch} must divide the token grid {self.grid}")
        if self.width % self.heads:
            raise PolicyError(f"field policy config: width ({self.width}) must be divisible by heads ({self.heads})")
        if not (math.isfinite(self.max_disparity) and 0 < self.max_disparity <= 1):
            raise PolicyError(f"field policy config: max_disparity must lie in (0, 1], got {self.max_disparity}")
        if not (math.isfinite(self.cond_range) and 0 <= self.cond_range <= 1):
            raise PolicyError(f"field policy config: cond_range must lie in [0, 1], got {self.cond_range}")
        if not (math.isfinite(self.concentration) and self.concentration > 0):
            raise PolicyError(f"field policy config: concentration must be > 0, got {self.concentration}")
        if not 0 <= self.sigma_min < 1:
            raise PolicyError(f"field policy config: sigma_min must lie in [0, 1), got {self.sigma_min}")
        if self.deterministic not in ("mode", "mean"):
            raise PolicyError(f"field policy config: deterministic must be 'mode' or 'mean', got {self.deterministic!r}")
        if self.object_order and not self.use_attention:
            raise PolicyError("field policy config: object_order reads the object words' attention; set use_attention")
        if not (self.learn_grid or self.token_offsets or self.learn_cond):
            raise PolicyError("field policy config: enable at least one of learn_grid, token_offsets, learn_cond")

    @property
    def parts(self) -> tuple[str, ...]:
        on = {"grid": self.learn_grid, "offset": self.token_offsets, "cond": self.learn_cond}
        return tuple(p for p in PARTS if on[p])

    @property
    def groups(self) -> tuple[int, int]:
        return self.grid[0] // self.patch, self.grid[1] // self.patch


# ---- the action maps, as pure functions --------------------------------------------------------
def grid_centre(d: torch.Tensor, centre: torch.Tensor, s_next: torch.Tensor, s_after: torch.Tensor) -> torch.Tensor:
    """Part 1: the next centre from d in (-1, 1); d = 0 gives ``s_next`` exactly. All (B,)."""
    up = s_next + d * (centre - s_next)
    down = s_next + d * (s_next - s_after)
    return torch.where(d >= 0, up, down)


def token_targets(d: torch.Tensor, centre: torch.Tensor, tau: torch.Tensor, delta: float) -> torch.Tensor:
    """Part 2: each token's next time from its offset d in (-1, 1); d = 0 gives min(c, tau) exactly.

    d, tau: (B, h, w); centre: (B,). The result lies in [max(0, c - delta/2), min(tau, c + delta/2)].
    """
    c = centre.view(-1, 1, 1)
    anchor = torch.minimum(c.expand_as(tau), tau)
    hi = torch.minimum(tau, c + delta / 2)
    lo = torch.clamp(c - delta / 2, min=0.0).expand_as(tau)
    return torch.where(d >= 0, anchor + d * (hi - anchor), anchor + d * (anchor - lo))


def cond_times(d: torch.Tensor, tau: torch.Tensor, tau_next: torch.Tensor, rho: float, sigma_min: float) -> torch.Tensor:
    """Part 3: ``tau - d rho (tau - tau_next)`` clamped to [sigma_min, 1]; d = 0 gives tau exactly."""
    return (tau - d * rho * (tau - tau_next)).clamp(min=sigma_min, max=1.0)


def _inverse_piecewise(value: torch.Tensor, anchor: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """d in [-1, 1] with anchor + d (hi - anchor) = value above the anchor, anchor + d (anchor - lo) below."""
    up = torch.where(hi > anchor, (value - anchor) / (hi - anchor).clamp(min=1e-12), torch.zeros_like(value))
    down = torch.where(anchor > lo, (value - anchor) / (anchor - lo).clamp(min=1e-12), torch.zeros_like(value))
    return torch.where(value >= anchor, up, down).clamp(-1.0, 1.0)


# ---- the network -----------------------------------------------------------------------------
class FieldNetwork(nn.Module):
    """Inputs -> Beta parameters of each action part. Inputs (the replay record): tokens (B, n, F)
    with n decision groups, temporal (B, 6), text (B, text_tokens, text_dim), pooled (B, pooled_dim),
    active (B, 3) flags of the parts that act at this step."""

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        n = cfg.groups[0] * cfg.groups[1]
        self.token_in = nn.Linear(3 * cfg.token_dim + TOKEN_EXTRA + int(cfg.object_order), w)
        self.token_pos = nn.Parameter(torch.randn(n, w) * 0.02)
        self.text_in = nn.Linear(cfg.text_dim, w)
        self.text_pos = nn.Parameter(torch.randn(cfg.text_tokens, w) * 0.02)
        self.pooled_in = nn.Linear(cfg.pooled_dim, w)
        self.temporal_in = nn.Sequential(nn.Linear(NUM_TEMPORAL * 17, w), nn.GELU(), nn.Linear(w, w))
        self.readout = nn.Parameter(torch.randn(1, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio, False) for _ in range(cfg.layers))
        self.grid_head = nn.Linear(w, 2)
        self.token_head = nn.Linear(w, 4)
        for head in (self.grid_head, self.token_head):  # zero: mode exactly 0.5, the synchronous sampler
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, inputs: dict[str, torch.Tensor]) -> BetaActions:
        cfg = self.cfg
        dev, dt = self.readout.device, self.readout.dtype
        tok = inputs["tokens"].to(dev, dt)
        seq = encode_sequence(self, inputs, self.token_in(tok) + self.token_pos)
        g = self.grid_head(seq[:, 0])  # (B, 2)
        t = self.token_head(seq[:, -tok.shape[1]:])  # (B, n, 4)
        raw = {"grid": (g[:, 0], g[:, 1]), "offset": (t[..., 0], t[..., 1]), "cond": (t[..., 2], t[..., 3])}
        active = inputs["active"].to(dev, dt)
        alpha, beta, flags = {}, {}, {}
        for i, part in enumerate(PARTS):
            if part not in cfg.parts:
                continue
            logit, log_k = raw[part]
            k = cfg.concentration * (torch.exp(log_k.clamp(-3.0, 3.0)) if cfg.learn_concentration else 1.0)
            alpha[part], beta[part] = mode_concentration(torch.sigmoid(logit), k)
            flags[part] = active[:, i]
        return BetaActions(alpha, beta, flags)


# ---- the policy ------------------------------------------------------------------------------
def _group_mean(field: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, h, w, ...) -> (B, h/p, w/p, ...) means over patch x patch groups."""
    if patch == 1:
        return field
    b, h, w = field.shape[:3]
    rest = field.shape[3:]
    x = field.reshape(b, h // patch, patch, w // patch, patch, *rest)
    return x.mean(dim=(2, 4))


def _upsample(groups: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, h/p, w/p) -> (B, h, w) by repetition."""
    if patch == 1:
        return groups
    return groups.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)


def apply_action(cfg: FieldConfig, state: State, action: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tau_next, tau_cond, next centre) of a field policy with config ``cfg`` at ``state`` from action parts
    u in (0, 1), d = 2u - 1 (a missing part is d = 0); reads the centre from ``state.memory``."""
    tau = state.tau
    bsz, dev = tau.shape[0], tau.device
    k, big_k = state.step, state.num_steps
    sig = state.sigmas.to(dev, tau.dtype)
    centre = state.memory.get("centre", torch.ones(bsz, device=dev, dtype=tau.dtype)).to(tau.dtype)

    def d_of(part, shape):
        if part not in action:
            return torch.zeros(shape, device=dev, dtype=tau.dtype)
        return (2 * action[part].to(dev, tau.dtype) - 1).reshape(shape)

    if k + 1 >= big_k:
        tau_next = torch.zeros_like(tau)
        new_centre = torch.zeros_like(centre)
    else:
        new_centre = grid_centre(d_of("grid", (bsz,)), centre, sig[k + 1].expand(bsz), sig[k + 2].expand(bsz))
        offsets = _upsample(d_of("offset", (bsz, *cfg.groups)), cfg.patch)
        tau_next = token_targets(offsets, new_centre, tau, cfg.max_disparity)
    if "cond" in action:
        d_c = _upsample(d_of("cond", (bsz, *cfg.groups)), cfg.patch)
        tau_cond = cond_times(d_c, tau, tau_next, cfg.cond_range, cfg.sigma_min)
    else:
        tau_cond = tau.clone()
    return tau_next, tau_cond, new_centre


def check_grid(cfg: FieldConfig, ctx: RunContext, what: str = "field policy") -> None:
    """The run's token grid must be the one ``cfg`` was built for (position embeddings and groups do not resample)."""
    if list(ctx.grid) != cfg.grid:
        raise PolicyError(
            f"this {what} was built for a {cfg.grid[0]}x{cfg.grid[1]} token grid, but this "
            f"run has {ctx.grid[0]}x{ctx.grid[1]}: sample at the image size it was trained for, or train one "
            "for this size (its token position embeddings do not resample)")


@register_policy("field")
class FieldPolicy(TrainablePolicy):
    """Per-token time fields learned with GRPO; see the module docstring."""

    paper = ("none directly: AsynDM names learned per-pixel schedules as future work; trained with "
             "AsyncDiff's GRPO (Eq. 14-16)")

    config_class = FieldConfig
    static_inputs = ("text", "pooled")
    sized_to_image = True  # the fields live on the token grid of the run's image size
    takes_warm_start = True  # policies.field_imitation fits it to a fixed policy

    def __init__(self, config: FieldConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.net = FieldNetwork(self.config)

    @classmethod
    def for_pipeline(cls, pipe, image_size: tuple[int | None, int | None] | None = None, **options) -> FieldPolicy:
        """Build with ``pipe``'s token/text widths and the token grid of images of ``image_size`` =
        (height, width) pixels (default: the pipeline's default size)."""
        from tpm.backbones import get_backbone

        backbone = get_backbone(pipe)
        h, w = backbone.resolve_size(*(image_size or (None, None)))
        return cls(**{**dims_for_pipeline(pipe), "grid": list(backbone.grid(h, w)), **options})

    def attention_layers(self, num_layers: int) -> list[int] | None:
        if not self.config.use_attention:
            return None
        layers = self.config.attention_layers
        return list(range(num_layers)) if layers is None else list(layers)

    def conditioning_time_levels(self) -> int | None:
        return self.config.time_levels

    def attention_tokens(self, prompts: list[str], text_words: list[list[int]] | None) -> list[list[int]] | None:
        # The network reads the object words' mean map only (_object_attention).
        if text_words is None:
            return None
        return [object_positions(p, tw, self.config.objects) for p, tw in zip(prompts, text_words)]

    def begin(self, ctx: RunContext) -> dict:
        check_grid(self.config, ctx)
        return {}

    # -- inputs ------------------------------------------------------------------------------------
    def _object_attention(self, state: State) -> torch.Tensor:
        """(B, h, w) mean attention of the object words, scaled to max 1 per sample; zeros without maps."""
        b, (h, w) = state.batch_size, state.grid
        out = torch.zeros(b, h, w, device=state.tau.device)
        if state.attention is None or state.text_words is None:
            return out
        for i, (prompt, words) in enumerate(zip(state.prompts, state.text_words)):
            pos = object_positions(prompt, words, self.config.objects)
            if pos:
                m = state.attention[i, pos].float().mean(0)
                out[i] = m / m.max().clamp(min=1e-12)
        return out

    def _first_object_share(self, state: State) -> torch.Tensor:
        """(B, h, w) the first-mentioned object word's share of the object words' summed attention,
        in [0, 1]; zeros for a sample with fewer than two distinct object words or without maps."""
        b, (h, w) = state.batch_size, state.grid
        out = torch.zeros(b, h, w, device=state.tau.device)
        if state.attention is None or state.text_words is None:
            return out
        for i, (prompt, words) in enumerate(zip(state.prompts, state.text_words)):
            names = list(dict.fromkeys(self.config.objects or find_objects(prompt)))  # distinct, prompt order
            groups = [g for g in (object_positions(prompt, words, [o]) for o in names) if g]
            if len(groups) < 2:
                continue
            maps = torch.stack([state.attention[i, g].float().mean(0) for g in groups])
            out[i] = (maps[0] / maps.sum(0).clamp(min=1e-12)).to(out.device)
        return out

    def inputs(self, state: State) -> dict[str, torch.Tensor]:
        """The network inputs at ``state`` (detached, float32): what a decision stores for replay."""
        cfg = self.config
        lat, vel, x0, emb = read_state(state, cfg, "this field policy",
                                       "build it with FieldPolicy.for_pipeline(pipe) for this backbone")
        bsz, n, _ = lat.shape
        h, w = state.grid
        prev_x0 = state.memory.get("prev_x0")
        if prev_x0 is None or state.x0 is None:
            change = torch.zeros(bsz, n, device=lat.device)
        else:  # log10 of the mean squared move of the x0 estimate, scaled to about [-1, 1]
            change = torch.log10(1e-4 + (x0 - prev_x0).pow(2).mean(-1)) / 4
        tau = state.tau.detach().float()
        attn = self._object_attention(state).reshape(bsz, n) if cfg.use_attention else torch.zeros(bsz, n)
        extra = [attn.to(lat.device)[..., None]]
        if cfg.object_order:
            extra.append(self._first_object_share(state).reshape(bsz, n, 1).to(lat.device))
        feats = torch.cat([lat, vel, x0, change[..., None], tau.reshape(bsz, n, 1), *extra],
                          dim=-1).reshape(bsz, h, w, -1)
        tokens = _group_mean(feats, cfg.patch).reshape(bsz, -1, feats.shape[-1])
        k, big_k = state.step, state.num_steps
        sig = state.sigmas.float().to(lat.device)
        centre = state.memory.get("centre", torch.ones(bsz, device=lat.device))
        s_next = sig[k + 1].expand(bsz)
        s_after = sig[min(k + 2, big_k)].expand(bsz)
        flat = tau.reshape(bsz, -1)
        temporal = torch.stack([torch.full((bsz,), k / big_k, device=lat.device), centre.float(), s_next, s_after,
                                flat.mean(1), flat.max(1).values - flat.min(1).values], dim=1)
        last = float(k + 1 == big_k)
        active = torch.tensor([1.0 - last, 1.0 - last, 1.0], device=lat.device).expand(bsz, 3).clone()
        return {"tokens": tokens.contiguous(), "temporal": temporal, "active": active,
                "text": pool_text(emb, cfg.text_tokens), "pooled": state.pooled.detach().float().clone()}

    def distribution(self, inputs: dict[str, torch.Tensor]) -> BetaActions:
        return self.net(inputs)

    # -- acting ------------------------------------------------------------------------------------
    def fields(self, state: State, action: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tau_next, tau_cond, next centre) from action parts u in (0, 1) (parts may be missing: d = 0)."""
        return apply_action(self.config, state, action)

    def act(self, state: State) -> Action:
        decision = self.decide(self.inputs(state))
        tau_next, tau_cond, centre = self.fields(state, decision.action)
        state.memory["centre"] = centre
        state.memory["prev_x0"] = None if state.x0 is None else state.x0.detach().float()
        return Action(tau_next=tau_next, tau_cond=tau_cond, log_prob=decision.log_prob, extras=decision.record)

    def decision_stats(self, actions: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean and spread of each part's d = 2u - 1 (0 everywhere is the synchronous sampler)."""
        out = {}
        for part, u in actions.items():
            d = 2 * u.float() - 1
            out[f"{part}/mean"] = float(d.mean())
            out[f"{part}/abs"] = float(d.abs().mean())
        return out
