"""``tpm.sample``: one denoising loop for every timestep policy.

At step k the policy sees the :class:`~tpm.policy.State` and returns the update field
``tau_next`` and the conditioning field ``tau_cond``; the backbone is queried at
(``x_k``, ``tau_cond``) with the pipeline's own guidance, and every token moves from ``tau_k``
to ``tau_next`` with the flow-matching Euler step per token (``x_tau = (1 - tau) x0 + tau * noise``,
velocity ``v = noise - x0``):

    x_{k+1} = x_k + (tau_next - tau_k) * v

For UNet pipelines (discrete-time models) the adapter holds flow-scaled latents and maps ``tau``
to the scheduler's timesteps (:mod:`tpm.backbones.discrete`): the same Euler step is then DDIM
(eta = 0) per pixel, and ``Backbone.update`` swaps in the ancestral step for DDPM.

With ``policy=None`` (synchronous) this is exactly the stock pipeline's loop: same prompt
encoding, same initial noise from the same generator, same scheduler grid (shift / dynamic
shifting), same guidance formula, same decode.

We write the loop ourselves instead of calling ``pipe(...)`` because stock pipelines pass one
timestep per sample to the transformer, and a policy needs one per token.

After each step the loop calls ``callback(out)`` with a :class:`StepOutput` (what the policy saw
and returned, what the backbone predicted, where the latents went), like k-diffusion's samplers;
``return_trajectory=True`` is such a callback (:class:`TrajectoryRecorder`).

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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from tpm.backbones import Backbone, Conditioning, get_backbone
from tpm.policy import Action, Policy, PolicyError, RunContext, State, Synchronous
from tpm.prompt_cache import conditioning


@dataclass
class StepOutput:
    """What one denoising step did; handed to ``callback`` after the step.

    Shapes: B samples, token grid (h, w), N = h*w tokens, C_tok channels per token.
    """

    step: int
    state: State  # what the policy saw (latents x_k, field tau_k, the previous step's outputs)
    action: Action  # what it returned
    tau_cond: torch.Tensor  # (B, h, w) field the backbone was queried at
    velocity: torch.Tensor  # (B, N, C_tok) guided model output (input guidance included)
    x0: torch.Tensor  # (B, N, C_tok) clean estimate x_k - tau_cond * velocity
    attention: torch.Tensor | None  # (B, n_text, h, w) text->image maps, if the policy asked for them
    latents: torch.Tensor  # (B, N, C_tok) x_{k+1}, after the update
    tau: torch.Tensor  # (B, h, w) tau_{k+1}, after the update
    # Denoiser evaluations per image so far in this sampling run: guidance branches, input guidance
    # and a policy's reference run included (what a comparison reports as NFE).
    nfe: int = 0


StepCallback = Callable[[StepOutput], None]


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


class TrajectoryRecorder:
    """A step callback that keeps the :class:`Trajectory` (what ``return_trajectory=True`` returns)."""

    def __init__(self, sigmas: torch.Tensor, grid: tuple[int, int], text_words: list[list[int]] | None = None):
        self.trajectory = Trajectory(sigmas=sigmas.cpu(), grid=grid, text_words=text_words)

    def __call__(self, out: StepOutput) -> None:
        t = self.trajectory
        if out.step == 0:  # the start: tau_0 (known regions already at 0) and x_0
            t.tau.append(out.state.tau.cpu())
            t.latents.append(out.state.latents.cpu())
        t.tau.append(out.tau.cpu())
        t.tau_cond.append(out.tau_cond.cpu())
        t.masks.append(None if out.action.mask is None else out.action.mask.cpu())
        t.latents.append(out.latents.cpu())
        t.attention.append(None if out.attention is None else out.attention.cpu())
        t.actions.append(out.action)


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


@dataclass
class _Known:
    """A policy's known region, broadcast to the batch, and the run's initial noise tokens."""

    mask: torch.Tensor  # (B, h, w) bool
    token_mask: torch.Tensor  # (B, N, 1) bool
    tokens: torch.Tensor  # (B, N, C_tok) clean latents
    noise: torch.Tensor  # (B, N, C_tok) the initial noise (input guidance re-noises with it)


def _known_region(policy: Policy, backbone: Backbone, latents: torch.Tensor, grid: tuple[int, int]) -> _Known | None:
    """The policy's known region checked against this run's shapes; fail loudly on shapes that do not fit."""
    known = policy.known_region()
    if known is None:
        return None
    noise = backbone.to_tokens(latents)
    b, n, c = noise.shape
    kt, km = known.tokens, known.mask
    if km.dtype != torch.bool or tuple(km.shape[1:]) != tuple(grid) or km.shape[0] not in (1, b):
        raise PolicyError(f"known-region mask must be bool of shape (1 or {b}, {grid[0]}, {grid[1]}), "
                          f"got {km.dtype} {tuple(km.shape)}; build the policy for this image size")
    if tuple(kt.shape[1:]) != (n, c) or kt.shape[0] not in (1, b):
        raise PolicyError(f"known-region latents must have shape (1 or {b}, {n}, {c}) for this pipeline, "
                          f"got {tuple(kt.shape)}; build the policy with this pipeline and image size")
    mask = km.to(noise.device).expand(b, *grid)
    return _Known(mask=mask, token_mask=mask.reshape(b, -1, 1), tokens=kt.to(noise.device, noise.dtype).expand(b, n, c),
                  noise=noise)


def _hold_known(known: _Known, backbone: Backbone, latents: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Native latents with the known tokens set to their clean values (bit for bit)."""
    return backbone.from_tokens(torch.where(known.token_mask, known.tokens, backbone.to_tokens(latents)), grid)


def _check_known_kept(known: _Known | None, action: Action, policy: Policy) -> None:
    if known is not None and bool((action.tau_next[known.mask] != 0).any()):
        raise PolicyError(f"{type(policy).__name__} declares a known region but moved it off time 0")


def _check_input_guidance(strength: float, time: float, known: _Known | None) -> None:
    if strength and known is None:
        raise PolicyError("input guidance needs a policy with a known region (e.g. policies.spatial.Inpaint)")
    if not 0.0 < time <= 1.0:
        raise PolicyError(f"input_guidance_time must be in (0, 1], got {time}")


def _input_guidance(backbone: Backbone, known: _Known, latents: torch.Tensor, tau_cond: torch.Tensor,
                    cond: Conditioning, v: torch.Tensor, strength: float, time: float,
                    grid: tuple[int, int]) -> torch.Tensor:
    """AsyncPatch Eq. 8: a second call with the known tokens re-noised (with the run's own noise) to
    ``time``, and the velocity extrapolated away from it."""
    noisy = torch.where(known.token_mask, (1 - time) * known.tokens + time * known.noise, backbone.to_tokens(latents))
    tau_n = torch.where(known.mask, torch.clamp(tau_cond, min=time), tau_cond)
    v_n = backbone.predict(backbone.from_tokens(noisy, grid), tau_n, cond).velocity
    return v + strength * (v - v_n)


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
    callback: StepCallback | None = None,
    nfe_offset: int = 0,
    attention_tokens: list[list[int]] | None = None,
) -> tuple[torch.Tensor, Trajectory | None]:
    """The loop itself, on native latents. Returns the final latents (in the layout the pipeline
    decodes, :meth:`Backbone.finish`) and, if ``record``, the trajectory.

    ``callback(out)`` runs after every step with a :class:`StepOutput`; ``nfe_offset`` is the
    number of evaluations already spent in this run (a reference run), where ``out.nfe`` starts.
    ``attention_tokens`` limits the captured maps to those text positions per sample.
    """
    bsz = latents.shape[0]
    num_steps = sigmas.shape[0] - 1
    sig = sigmas.to(latents.device)
    tau = sig[0].expand(bsz, *grid).clone()
    known = _known_region(policy, backbone, latents, grid)
    _check_input_guidance(input_guidance, input_guidance_time, known)
    if known is not None:
        latents = _hold_known(known, backbone, latents, grid)
        tau = torch.where(known.mask, torch.zeros_like(tau), tau)
    recorder = TrajectoryRecorder(sigmas, grid, text_words) if record else None
    callbacks = [cb for cb in (recorder, callback) if cb is not None]
    nfe_per_step = backbone.evaluations_per_call(cond) * (2 if input_guidance else 1)
    nfe = nfe_offset
    tokens = backbone.to_tokens(latents)
    # Passed only when some maps are limited, so backbones without the option keep working.
    token_kwargs = {"attention_tokens": attention_tokens} if attention_layers and attention_tokens is not None else {}
    velocity = x0 = attention = None
    for k in tqdm(range(num_steps), disable=not progress, desc="denoising", leave=False):
        state = State(
            step=k, num_steps=num_steps, sigmas=sig, tau=tau, latents=tokens, grid=grid, prompts=cond.prompts,
            velocity=velocity, x0=x0, attention=attention, text_words=text_words, memory=memory,
            text_embeds=cond.embeds, pooled=cond.pooled,
        )
        action = policy.act(state)
        _check_action(action, tau, k)
        _check_known_kept(known, action, policy)
        tau_cond = tau if action.tau_cond is None else action.tau_cond
        pred = backbone.predict(latents, tau_cond, cond, attention_layers=attention_layers, **token_kwargs)
        v = pred.velocity
        if input_guidance:
            v = _input_guidance(backbone, known, latents, tau_cond, cond, v, input_guidance, input_guidance_time, grid)
        nfe += nfe_per_step
        new_latents = backbone.update(latents, tau, tau_cond, action, v)
        if known is not None:  # the update is 0 there already; this makes "unchanged" hold bit for bit
            new_latents = _hold_known(known, backbone, new_latents, grid)
        velocity = backbone.to_tokens(v)
        x0 = backbone.to_tokens(latents - backbone.expand_field(tau_cond).to(latents.dtype) * v)
        attention = pred.attention
        latents, tau = new_latents, action.tau_next
        tokens = backbone.to_tokens(latents)
        out = StepOutput(step=k, state=state, action=action, tau_cond=tau_cond, velocity=velocity, x0=x0,
                         attention=attention, latents=tokens, tau=tau, nfe=nfe)
        for cb in callbacks:
            cb(out)
    return backbone.finish(latents, tau), (recorder.trajectory if recorder is not None else None)


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
    time_levels: int | None | str = "policy",
    progress: bool = False,
    input_guidance: float = 0.0,
    input_guidance_time: float = 1.0,
    callback: StepCallback | None = None,
) -> SampleOutput:
    """Sample images from a diffusers pipeline under a timestep policy.

    Args mirror the pipeline's ``__call__`` (defaults are the pipeline's own). ``policy=None``
    is synchronous and reproduces ``pipe(prompt, ...)``. ``return_trajectory=True`` also
    returns per-step fields, conditioning fields, masks, latents and attention maps.
    ``callback(out)`` runs after every step with a :class:`StepOutput`.
    ``time_resolution`` optionally quantises conditioning times, and ``time_levels`` bounds the
    distinct conditioning times per sample (see :mod:`tpm.backbones.modulation`); the default
    ``"policy"`` takes the policy's ``conditioning_time_levels()`` (64 for learned per-token fields,
    ``None`` = exact for the others). ``input_guidance`` (lambda, 0 = off) and
    ``input_guidance_time`` apply AsyncPatch's input guidance to policies with a known region
    (module docstring); it costs a second backbone call per step.
    """
    prompts = _as_list(prompt)
    if policy is None:
        policy = Synchronous()
    if not isinstance(policy, Policy):
        raise PolicyError(f"policy must be a tpm Policy (got {type(policy).__name__}); use policies.load(name)")
    if time_levels == "policy":
        time_levels = policy.conditioning_time_levels()
    elif time_levels is not None and (not isinstance(time_levels, int) or time_levels < 2):
        raise PolicyError(f'time_levels must be an int >= 2, None (exact) or "policy", got {time_levels!r}')
    backbone = get_backbone(pipe, time_resolution=time_resolution, time_levels=time_levels)
    policy.check_backbone(backbone)
    steps = num_inference_steps if num_inference_steps is not None else backbone.call_default("num_inference_steps")
    if steps is None or int(steps) < 1:
        raise PolicyError(f"num_inference_steps must be >= 1, got {steps}")
    height, width = backbone.resolve_size(height, width)
    cond = conditioning(pipe, backbone, prompts, guidance_scale, negative_prompt, max_sequence_length, true_cfg_scale)
    x = backbone.prepare_latents(len(prompts), height, width, generator, latents)
    sigmas, _ = backbone.set_timesteps(int(steps), x)
    x = backbone.start(x, sigmas)
    grid = backbone.grid(height, width)
    layers = policy.attention_layers_for(backbone)
    n_layers = backbone.num_attention_layers
    if layers is not None and any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"policy asks for attention layers {layers}, but the model has {n_layers} "
                         f"joint-attention layers (indices 0..{n_layers - 1})")
    text_words = backbone.text_words(prompts, cond.extras["max_sequence_length"])
    tokens = policy.attention_tokens(prompts, text_words) if layers is not None else None
    spent = [0]  # evaluations of reference runs, counted into the main run's NFE

    def reference_run(ref_layers: list[int] | None):
        def count(out: StepOutput) -> None:
            spent[0] = out.nfe

        _, ref = denoise(backbone, x.clone(), cond, sigmas, policy=Synchronous(), memory={}, grid=grid,
                         text_words=text_words, attention_layers=ref_layers, record=True, callback=count,
                         nfe_offset=spent[0],
                         attention_tokens=policy.attention_tokens(prompts, text_words))
        return ref

    ctx = RunContext(batch_size=len(prompts), grid=grid, num_steps=int(steps), prompts=prompts,
                     num_attention_layers=backbone.num_attention_layers, reference_run=reference_run,
                     default_attention_layers=backbone.default_attention_layers())
    memory = policy.begin(ctx)
    x, traj = denoise(backbone, x, cond, sigmas, policy=policy, memory=memory, grid=grid, text_words=text_words,
                      attention_layers=layers, record=return_trajectory, progress=progress, input_guidance=input_guidance,
                      input_guidance_time=input_guidance_time, callback=callback, nfe_offset=spent[0],
                      attention_tokens=tokens)
    images = backbone.decode_images(x, height, width, output_type)
    return SampleOutput(images=images, trajectory=traj)
