"""``tpm.sample``: one denoising loop for every timestep policy.

At step k the policy sees the :class:`~tpm.policy.State` and returns the update field
``tau_next`` and the conditioning field ``tau_cond``; the backbone is queried at
(``x_k``, ``tau_cond``) with the pipeline's own guidance, and every token moves from ``tau_k``
to ``tau_next`` with the flow-matching Euler step per token (SPEC §1):

    x_{k+1} = x_k + (tau_next - tau_k) * v

With ``policy=None`` (synchronous) this is exactly the stock pipeline's loop: same prompt
encoding, same initial noise from the same generator, same scheduler grid (shift / dynamic
shifting), same guidance formula, same decode.

We write the loop ourselves instead of calling ``pipe(...)`` because stock pipelines pass one
timestep per sample to the transformer (STYLE.md item 3).

Known regions (AsyncPatch §3.2). A policy may declare tokens known
(:meth:`~tpm.policy.Policy.known_region`): the loop writes their clean latents in before the
first step, starts them at time 0 and keeps them bit-exact. Input guidance (AsyncPatch §3.3,
Eq. 6-8) then optionally queries the backbone a second time with the known tokens re-noised to
``input_guidance_time`` and extrapolates away from that prediction:
``v = v_clean + lambda * (v_clean - v_noisy)``, both already classifier-free guided (Eq. 6-7).
Velocity is affine in the score for a token whose latent and time agree in both calls, so the
extrapolation of velocities is that of scores on the tokens being generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from tpm.backbones import Backbone, Conditioning, get_backbone
from tpm.fields import synchronous_next
from tpm.policy import Action, KnownRegion, Policy, PolicyError, RunContext, State


class GridPolicy(Policy):
    """The pipeline's own synchronous grid (what ``policy=None`` means); not registered.

    ``policies.Synchronous`` is the registered, saveable twin of this class.
    """

    config_class = dict

    def __init__(self):
        super().__init__(config={})

    def act(self, state: State) -> Action:
        return Action(tau_next=synchronous_next(state))


@dataclass
class Trajectory:
    """What happened at each step (for plots and training). Fields are (B, h, w)."""

    sigmas: torch.Tensor  # (K+1,) synchronous grid
    grid: tuple[int, int]
    tau: list[torch.Tensor] = field(default_factory=list)  # K+1 update fields, tau[0] = start
    tau_cond: list[torch.Tensor] = field(default_factory=list)  # K conditioning fields
    masks: list[torch.Tensor | None] = field(default_factory=list)  # K policy masks
    latents: list[torch.Tensor] = field(default_factory=list)  # K+1 token latents (B, N, C_tok)
    attention: list[torch.Tensor | None] = field(default_factory=list)  # K maps (B, n_text, h, w)
    actions: list[Action] = field(default_factory=list)  # K
    text_words: list[list[int]] | None = None

    @property
    def num_steps(self) -> int:
        return len(self.tau_cond)


@dataclass
class SampleOutput:
    images: Any  # list of PIL images, np.ndarray, or latents, as the pipeline's output_type gives
    trajectory: Trajectory | None = None


def _as_list(prompt: str | list[str]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise TypeError("prompt must be a string or a list of strings")
    if not prompt:
        raise ValueError("prompt is an empty list; pass at least one prompt")
    return list(prompt)


def _check_action(action: Action, tau: torch.Tensor, step: int) -> None:
    """Fail at the policy, not deep in the backbone: shapes, finiteness, tau_next in [0, 1]."""
    nxt = action.tau_next
    if tuple(nxt.shape) != tuple(tau.shape):
        raise ValueError(f"step {step}: policy returned tau_next of shape {tuple(nxt.shape)}, expected {tuple(tau.shape)}")
    if not bool(((nxt >= 0) & (nxt <= 1)).all()):
        raise ValueError(f"step {step}: policy returned tau_next values outside [0, 1] (or NaN)")
    cond = action.tau_cond
    if cond is not None:
        # tau_cond may leave [0, 1] slightly (a pseudo-timestep below the last grid value), but not be NaN.
        if tuple(cond.shape) != tuple(tau.shape):
            raise ValueError(f"step {step}: policy returned tau_cond of shape {tuple(cond.shape)}, "
                             f"expected {tuple(tau.shape)}")
        if not bool(torch.isfinite(cond).all()):
            raise ValueError(f"step {step}: policy returned a non-finite tau_cond")


def _known_tensors(known: KnownRegion, tokens: torch.Tensor, grid: tuple[int, int]):
    """Broadcast a policy's known region to the batch; fail loudly on shapes that do not fit."""
    b, n, c = tokens.shape
    kt, km = known.tokens, known.mask
    if km.dtype != torch.bool or tuple(km.shape[1:]) != tuple(grid) or km.shape[0] not in (1, b):
        raise PolicyError(f"known-region mask must be bool of shape (1 or {b}, {grid[0]}, {grid[1]}), "
                          f"got {km.dtype} {tuple(km.shape)}; build the policy for this image size")
    if tuple(kt.shape[1:]) != (n, c) or kt.shape[0] not in (1, b):
        raise PolicyError(f"known-region latents must have shape (1 or {b}, {n}, {c}) for this pipeline, "
                          f"got {tuple(kt.shape)}; build the policy with this pipeline and image size")
    km = km.to(tokens.device).expand(b, *grid)
    kt = kt.to(tokens.device, tokens.dtype).expand(b, n, c)
    return km, kt


def denoise(
    backbone: Backbone,
    latents: torch.Tensor,
    cond: Conditioning,
    sigmas: torch.Tensor,
    policy: Policy,
    memory: dict[str, Any],
    grid: tuple[int, int],
    text_words: list[list[int]] | None,
    attention_layers: list[int] | None,
    record: bool = False,
    progress: bool = False,
    input_guidance: float = 0.0,
    input_guidance_time: float = 1.0,
) -> tuple[torch.Tensor, Trajectory | None]:
    """The loop itself, on native latents. Returns the final latents and, if asked, the trajectory."""
    bsz = latents.shape[0]
    num_steps = sigmas.shape[0] - 1
    sig = sigmas.to(latents.device)
    tau = sig[0].expand(bsz, *grid).clone()
    known = policy.known_region()
    if input_guidance and known is None:
        raise PolicyError("input guidance needs a policy with a known region (e.g. policies.spatial.Inpaint)")
    if not 0.0 < input_guidance_time <= 1.0:
        raise PolicyError(f"input_guidance_time must be in (0, 1], got {input_guidance_time}")
    if known is not None:
        noise_tokens = backbone.to_tokens(latents)
        kmask, ktokens = _known_tensors(known, noise_tokens, grid)
        ktok_mask = kmask.reshape(bsz, -1, 1)
        latents = backbone.from_tokens(torch.where(ktok_mask, ktokens, noise_tokens), grid)
        tau = torch.where(kmask, torch.zeros_like(tau), tau)
    traj = Trajectory(sigmas=sigmas.cpu(), grid=grid, text_words=text_words) if record else None
    if traj is not None:
        traj.tau.append(tau.cpu())
        traj.latents.append(backbone.to_tokens(latents).cpu())
    velocity = x0 = attention = None
    for k in tqdm(range(num_steps), disable=not progress, desc="denoising", leave=False):
        state = State(
            step=k, num_steps=num_steps, sigmas=sig, tau=tau, latents=backbone.to_tokens(latents), grid=grid,
            prompts=cond.prompts, velocity=velocity, x0=x0, attention=attention, text_words=text_words,
            memory=memory, text_embeds=cond.embeds, pooled=cond.pooled,
        )
        action = policy.act(state)
        _check_action(action, tau, k)
        tau_cond = tau if action.tau_cond is None else action.tau_cond
        if known is not None and bool((action.tau_next[kmask] != 0).any()):
            raise PolicyError(f"{type(policy).__name__} declares a known region but moved it off time 0")
        pred = backbone.predict(latents, tau_cond, cond, attention_layers=attention_layers)
        v = pred.velocity
        if input_guidance:
            # AsyncPatch Eq. 8: the noisier input re-noises the known tokens with the run's own noise.
            t_n = input_guidance_time
            noisy = torch.where(ktok_mask, (1 - t_n) * ktokens + t_n * noise_tokens, backbone.to_tokens(latents))
            tau_n = torch.where(kmask, torch.clamp(tau_cond, min=t_n), tau_cond)
            v_n = backbone.predict(backbone.from_tokens(noisy, grid), tau_n, cond).velocity
            v = v + input_guidance * (v - v_n)
        # Euler per token in float32, cast back like FlowMatchEulerDiscreteScheduler.step.
        delta = action.tau_next - tau
        if action.step_scale is not None:
            scale = action.step_scale
            delta = delta * (scale.view(-1, 1, 1) if scale.ndim == 1 else scale)
        dt = backbone.expand_field(delta).to(torch.float32)
        # dt * v in v's dtype, as the scheduler's 0-dim dt * model_output is (bit-exact in bf16 too).
        new_latents = (latents.to(torch.float32) + dt.to(v.dtype) * v).to(v.dtype)
        if known is not None:  # delta is 0 there already; this makes "unchanged" hold bit for bit
            new_latents = backbone.from_tokens(torch.where(ktok_mask, ktokens, backbone.to_tokens(new_latents)), grid)
        velocity = backbone.to_tokens(v)
        x0 = backbone.to_tokens(latents - backbone.expand_field(tau_cond).to(latents.dtype) * v)
        attention = pred.attention
        latents, tau = new_latents, action.tau_next
        if traj is not None:
            traj.tau.append(tau.cpu())
            traj.tau_cond.append(tau_cond.cpu())
            traj.masks.append(None if action.mask is None else action.mask.cpu())
            traj.latents.append(backbone.to_tokens(latents).cpu())
            traj.attention.append(None if attention is None else attention.cpu())
            traj.actions.append(action)
    return latents, traj


@torch.no_grad()
def sample(
    pipe,
    prompt: str | list[str],
    *,
    policy: Policy | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    output_type: str = "pil",
    return_trajectory: bool = False,
    negative_prompt: str | list[str] | None = None,
    true_cfg_scale: float = 1.0,
    latents: torch.Tensor | None = None,
    max_sequence_length: int | None = None,
    time_resolution: float | None = None,
    progress: bool = False,
    input_guidance: float = 0.0,
    input_guidance_time: float = 1.0,
) -> SampleOutput:
    """Sample images from a diffusers pipeline under a timestep policy.

    Args mirror the pipeline's ``__call__`` (defaults are the pipeline's own). ``policy=None``
    is synchronous and reproduces ``pipe(prompt, ...)``. ``return_trajectory=True`` also
    returns per-step fields, conditioning fields, masks, latents and attention maps.
    ``time_resolution`` optionally quantises conditioning times (see
    :mod:`tpm.backbones.modulation`). ``input_guidance`` (lambda, 0 = off) and
    ``input_guidance_time`` apply AsyncPatch's input guidance to policies with a known region
    (module docstring); it costs a second backbone call per step.
    """
    backbone = get_backbone(pipe, time_resolution=time_resolution)
    prompts = _as_list(prompt)
    if policy is None:
        policy = GridPolicy()
    if not isinstance(policy, Policy):
        raise PolicyError(f"policy must be a tpm Policy (got {type(policy).__name__}); use policies.load(name)")
    steps = num_inference_steps if num_inference_steps is not None else backbone.call_default("num_inference_steps")
    if steps is None or int(steps) < 1:
        raise PolicyError(f"num_inference_steps must be >= 1, got {steps}")
    gscale = guidance_scale if guidance_scale is not None else backbone.call_default("guidance_scale")
    height, width = backbone.resolve_size(height, width)
    if negative_prompt is not None:
        negative_prompt = _as_list(negative_prompt)
        if len(negative_prompt) == 1 and len(prompts) > 1:
            negative_prompt = negative_prompt * len(prompts)
    cond = backbone.encode(prompts, gscale, negative_prompt=negative_prompt,
                           max_sequence_length=max_sequence_length, true_cfg_scale=true_cfg_scale)
    x = backbone.prepare_latents(len(prompts), height, width, generator, latents)
    sigmas, _ = backbone.set_timesteps(int(steps), x)
    grid = backbone.grid(height, width)
    layers = policy.attention_layers(backbone.num_attention_layers)
    n_layers = backbone.num_attention_layers
    if layers is not None and any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"policy asks for attention layers {layers}, but the model has {n_layers} "
                         f"joint-attention layers (indices 0..{n_layers - 1})")
    text_words = backbone.text_words(prompts, cond.extras["max_sequence_length"])

    def reference_run(ref_layers: list[int] | None):
        _, ref = denoise(backbone, x.clone(), cond, sigmas, GridPolicy(), {}, grid, text_words,
                         ref_layers, record=True)
        return ref

    ctx = RunContext(batch_size=len(prompts), grid=grid, num_steps=int(steps), prompts=prompts,
                     num_attention_layers=backbone.num_attention_layers, reference_run=reference_run)
    memory = policy.begin(ctx)
    x, traj = denoise(backbone, x, cond, sigmas, policy, memory, grid, text_words, layers,
                      record=return_trajectory, progress=progress, input_guidance=input_guidance,
                      input_guidance_time=input_guidance_time)
    images = backbone.decode(x, height, width, output_type)
    return SampleOutput(images=images, trajectory=traj)
