"""Learned schedules in unchanged pipelines: a policy exported as a diffusers scheduler.

A policy whose fields are uniform (every token at the same time) is, step by step, two numbers:
the update time ``tau_{k+1}`` every token moves to, and the time ``tau_cond_k`` the denoiser is
told. A stock pipeline's loop has room for both. ``FluxPipeline`` and ``StableDiffusion3Pipeline``
pass ``timesteps[i]`` to the transformer and step with the scheduler's own ``sigmas``;
``StableDiffusionPipeline`` passes ``timesteps[i]`` to the UNet, after the scheduler has scaled
its input (``scale_model_input``), and then calls ``step``. So
``pipe.scheduler = to_scheduler(pipe, policy, K)`` makes ``pipe(prompt, num_inference_steps=K)``
reproduce ``tpm.sample(pipe, prompt, policy=policy, num_inference_steps=K)``.

- :class:`FlowMatchTableScheduler` (Flux, SD3, SD3.5): ``sigmas`` is the update grid (K+1
  values), ``timesteps = 1000 * tau_cond`` what the transformer is told. It shifts nothing: the
  table already holds the pipeline's shift (``shift``, ``mu`` / dynamic shifting) and the policy's
  own moves, so ``mu`` and the pipeline's default ``sigmas`` are checked, not applied.
- :class:`DiscreteTableScheduler` (``StableDiffusionPipeline``; exported from DDIM, Euler or
  DDPM): the pipeline's latents are tpm's flow latents ``y = x_t / (a_t + b_t)``
  (:mod:`tpm.backbones.discrete`), ``scale_model_input`` gives the UNet ``x`` at the told time,
  and ``step`` is the Euler step in flow coordinates (DDIM with eta = 0, AsynDM Eq. 14-15, and
  Euler-discrete) or the ancestral per-pixel DDPM step (AsynDM Eq. 4-5); the last step returns
  the latents in the layout the source scheduler ends in, so the pipeline's decode is unchanged.
  Multistep or higher-order schedulers (PNDM, DPM-Solver, UniPC, Heun, LMS) cannot be a source:
  ``tpm.sample`` itself refuses them (their update combines several steps' outputs).

What cannot be a scheduler, and is refused with a message saying so: per-token fields (AsynDM,
token offsets, a per-token conditioning shift: a scheduler tells every token one time), known
regions (inpainting), and a scaled update (``velocity_scale``). State-dependent policies (the
TPM, a trained field policy) are exported on request as their mean table over a prompt set
(``prompts=``); the held-out cost of that distillation is measured on ``test_prompts``.

A wrong ``num_inference_steps``, custom ``sigmas`` / ``timesteps``, another image size under
dynamic shifting, or a pipeline of another family raise :class:`ScheduleError` with what to do.

Written by hand: diffusers' schedulers derive ``timesteps`` from ``sigmas`` (or the reverse) and
shift them; none carries a conditioning time that differs from the update time, and
``retrieve_timesteps`` refuses ``sigmas`` and ``timesteps`` together, so the table has to live in
the scheduler itself. The saved form is diffusers' own (``scheduler_config.json``,
``save_pretrained`` / ``from_pretrained``) plus a model card ``README.md``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from tpm.backbones.discrete import coefficients, ddpm_step
from tpm.model_card import CARD_NAME
from tpm.policy import Action, Policy, PolicyError, State, register_policy

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
FLOW_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")
UNET_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
PROBE_PROMPTS = ("a red circle left of a blue square", "two dogs riding a bike on the beach")

__all__ = ["SCHEDULER_CONFIG_NAME", "DiscreteTableScheduler", "FlowMatchTableScheduler", "ScheduleError",
           "ScheduleTable", "Trace", "from_pretrained", "table_policy", "to_scheduler", "trace_policy"]


class ScheduleError(ValueError):
    """A policy that cannot be a scheduler, or an exported scheduler used where it does not apply."""


# ---- the schedulers ---------------------------------------------------------------------------
class _TableScheduler(SchedulerMixin, ConfigMixin):
    """What both table schedulers share: the step counter, the step-count check, the card."""

    config_name = SCHEDULER_CONFIG_NAME
    _compatibles: list = []
    order = 1

    @property
    def num_steps(self) -> int:
        return len(self.config.timesteps)

    def _family(self) -> str:
        return self.config.pipeline

    def _check_steps(self, n: int | None) -> None:
        k = self.num_steps
        if n is None or int(n) != k:
            raise ScheduleError(
                f"this scheduler holds a {k}-step schedule exported by tpm for {self._family()}; call the "
                f"pipeline with num_inference_steps={k} (got {n}), or export one for {n} steps "
                f"(tpm.to_scheduler(pipe, policy, num_inference_steps={n}))")

    def _index(self) -> int:
        if self._step_index is None:
            raise ScheduleError("call set_timesteps before step (the pipeline does this itself)")
        if self._step_index >= self.num_steps:
            raise ScheduleError(f"step called more than num_inference_steps={self.num_steps} times")
        return self._step_index

    def set_begin_index(self, begin_index: int = 0):
        if begin_index != 0:
            raise ScheduleError("a tpm schedule runs from its first step; img2img-style partial schedules "
                                "(begin_index > 0) are not supported")
        self._begin_index = 0

    @property
    def begin_index(self):
        return self._begin_index

    @property
    def step_index(self):
        return self._step_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """``scheduler_config.json`` (diffusers) and a model card ``README.md`` (the table, its source,
        how it was measured)."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        with open(os.path.join(save_directory, CARD_NAME), "w") as f:
            f.write(scheduler_card(self))


class FlowMatchTableScheduler(_TableScheduler):
    """A fixed flow-matching schedule for ``FluxPipeline`` / ``StableDiffusion3Pipeline``.

    ``sigmas`` (K+1): the update grid, stepped with ``x <- x + (sigmas[i+1] - sigmas[i]) * v``
    exactly as ``FlowMatchEulerDiscreteScheduler.step`` does; ``cond_sigmas`` (K): the times the
    transformer is told, handed to the pipeline as ``timesteps = 1000 * cond_sigmas`` (for Flux the
    float32 value whose ``/ 1000 * 1000`` round trip gives back ``1000 * cond_sigmas``). ``mu`` is
    the dynamic shift the table was made with (``None`` when the source scheduler had none); the
    shift parameters are the source scheduler's, so the pipeline computes the same ``mu`` and a
    call at another image size is caught instead of silently using this size's grid.
    """

    @register_to_config
    def __init__(self, sigmas: list[float] | None = None, cond_sigmas: list[float] | None = None,
                 timesteps: list[float] | None = None, pipeline: str = "FluxPipeline", mu: float | None = None,
                 image_seq_len: int | None = None, num_train_timesteps: int = 1000,
                 use_dynamic_shifting: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096, export_info: dict | None = None):
        if sigmas is None or cond_sigmas is None or timesteps is None:
            raise ScheduleError("FlowMatchTableScheduler is made by tpm.to_scheduler(pipe, policy, K) "
                                "or loaded with tpm.schedulers.from_pretrained(DIR)")
        if pipeline not in FLOW_PIPELINES:
            raise ScheduleError(f"pipeline must be one of {FLOW_PIPELINES}, got {pipeline!r}")
        if len(sigmas) != len(timesteps) + 1 or len(cond_sigmas) != len(timesteps) or not timesteps:
            raise ScheduleError(f"a K-step table has K+1 sigmas and K timesteps; got {len(sigmas)} and {len(timesteps)}")
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        self.timesteps = torch.tensor(timesteps, dtype=torch.float32)
        self.num_inference_steps = len(timesteps)
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None):
        """Load the table (what ``retrieve_timesteps`` calls). Checks, and applies nothing of, what the
        pipeline passes: Flux passes its default ``sigmas = linspace(1, 1/K, K)`` and ``mu``; SD3
        passes neither (``mu`` under dynamic shifting)."""
        cfg = self.config
        flux = cfg.pipeline == "FluxPipeline"
        if timesteps is not None:
            raise ScheduleError("this scheduler carries its own timesteps; do not pass timesteps= to the pipeline")
        if flux and sigmas is None:
            raise ScheduleError(
                "this scheduler was exported for FluxPipeline, but the pipeline calling it passed no sigmas, as "
                "StableDiffusion3Pipeline / StableDiffusionPipeline do; export one for this pipeline "
                "(tpm.to_scheduler(pipe, policy, K))")
        if not flux and sigmas is not None:
            raise ScheduleError(
                f"this scheduler was exported for {cfg.pipeline} and carries its own sigmas; it was called with "
                "sigmas= (FluxPipeline always passes them; or sigmas= was given to the pipeline): use it with "
                f"{cfg.pipeline} and do not pass sigmas=")
        n = len(sigmas) if sigmas is not None else num_inference_steps
        self._check_steps(n)
        if flux:
            default = np.linspace(1.0, 1 / n, n)
            if np.abs(np.asarray(sigmas, dtype=np.float64) - default).max() > 1e-6:
                raise ScheduleError("this scheduler carries its own sigmas; do not pass sigmas= to the pipeline")
        if cfg.mu is not None:
            if mu is None or abs(float(mu) - cfg.mu) > 1e-6:
                raise ScheduleError(
                    f"this schedule was exported at {cfg.image_seq_len} image tokens, whose dynamic shift is "
                    f"mu={cfg.mu:.6g}; this call gives mu={mu}: sample at the exported image size "
                    f"({(cfg.export_info or {}).get('size', 'see the model card')}) or export one for this size")
        elif mu is not None and not flux:
            raise ScheduleError("this schedule has no dynamic shift; do not pass mu= to the pipeline")
        self.sigmas = torch.tensor(cfg.sigmas, dtype=torch.float32, device=device)
        self.timesteps = torch.tensor(cfg.timesteps, dtype=torch.float32, device=device)
        self.num_inference_steps = n
        self._step_index = 0
        self._begin_index = None

    def scale_model_input(self, sample, timestep=None):
        # Flow pipelines never call this; UNet pipelines do. Fail here rather than denoise on a wrong scale.
        raise ScheduleError(f"this scheduler was exported for {self.config.pipeline}; a UNet pipeline "
                            "(StableDiffusionPipeline) needs one exported from it: tpm.to_scheduler(pipe, policy, K)")

    def scale_noise(self, sample, timestep, noise=None):
        # Image-to-image pipelines start part-way down the grid; a tpm schedule starts from noise.
        raise ScheduleError("a tpm schedule runs from pure noise; image-to-image / inpainting pipelines "
                            f"(partial schedules) are not supported; use {self.config.pipeline}")

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs):
        """``x + (sigmas[i+1] - sigmas[i]) * v`` in float32, cast back (``FlowMatchEulerDiscreteScheduler.step``)."""
        i = self._index()
        sig = self.sigmas.to(sample.device)
        dt = sig[i + 1] - sig[i]
        prev = (sample.to(torch.float32) + dt * model_output).to(model_output.dtype)
        self._step_index = i + 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class DiscreteTableScheduler(_TableScheduler):
    """A fixed schedule for ``StableDiffusionPipeline`` (discrete-time UNets), in tpm's flow time.

    The pipeline starts from the source scheduler's initial latents (its ``init_noise_sigma``);
    the first step divides them by ``start_scale`` into flow latents ``y``, which the loop then
    holds (tpm's ``Backbone.start``, same arithmetic). ``taus`` (K+1): the update grid;
    ``cond_taus`` (K): the told times, ``timesteps`` (K): their UNet timesteps (the scheduler's
    sigma table, interpolated); ``update``: ``"euler"`` (DDIM eta = 0 / Euler-discrete) or
    ``"ddpm"`` (ancestral, noise from the call's generator at the steps in ``noise_steps``);
    ``final_scale``: flow latents -> the source scheduler's layout after the last step.
    """

    @register_to_config
    def __init__(self, taus: list[float] | None = None, cond_taus: list[float] | None = None,
                 timesteps: list[float] | None = None, pipeline: str = "StableDiffusionPipeline",
                 source_scheduler: str = "DDIMScheduler", update: str = "euler", prediction_type: str = "epsilon",
                 init_noise_sigma: float = 1.0, start_scale: float = 1.0, final_scale: float = 1.0, tau_max: float = 1.0,
                 noise_steps: list[bool] | None = None, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 num_train_timesteps: int = 1000, export_info: dict | None = None):
        if taus is None or cond_taus is None or timesteps is None:
            raise ScheduleError("DiscreteTableScheduler is made by tpm.to_scheduler(pipe, policy, K) "
                                "or loaded with tpm.schedulers.from_pretrained(DIR)")
        if update not in ("euler", "ddpm"):
            raise ScheduleError(f"update must be 'euler' or 'ddpm', got {update!r}")
        if len(taus) != len(timesteps) + 1 or len(cond_taus) != len(timesteps) or not timesteps:
            raise ScheduleError(f"a K-step table has K+1 taus and K timesteps; got {len(taus)} and {len(timesteps)}")
        self.timesteps = torch.tensor(timesteps, dtype=torch.float32)
        self.num_inference_steps = len(timesteps)
        self._step_index = None
        self._begin_index = None
        self._scaled_at = None

    @property
    def init_noise_sigma(self) -> float:
        return self.config.init_noise_sigma

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None,
                      timesteps=None):
        """Load the table (``StableDiffusionPipeline`` passes only ``num_inference_steps``)."""
        cfg = self.config
        if sigmas is not None or mu is not None:
            raise ScheduleError(
                f"this scheduler was exported for {cfg.pipeline}, but was called with "
                f"{'sigmas' if sigmas is not None else 'mu'}= as FluxPipeline calls its scheduler (or sigmas= was "
                "given to the pipeline): export one for this pipeline and do not pass sigmas=")
        if timesteps is not None:
            raise ScheduleError("this scheduler carries its own timesteps; do not pass timesteps= to the pipeline")
        self._check_steps(num_inference_steps)
        self.timesteps = torch.tensor(cfg.timesteps, dtype=torch.float32, device=device)
        self.num_inference_steps = self.num_steps
        self._step_index = 0
        self._scaled_at = None

    def _cond(self, i: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tc = torch.tensor(self.config.cond_taus[i], dtype=torch.float64, device=device).clamp(0, self.config.tau_max)
        return coefficients(tc)

    def _flow(self, i: int, sample: torch.Tensor) -> torch.Tensor:
        """The pipeline's latents as flow latents: converted at the first step, held as such after it."""
        if i == 0:
            return (sample.to(torch.float64) / self.config.start_scale).to(sample.dtype)
        return sample

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The UNet's input ``x_t = y / n(tau_cond)`` at the told time (as tpm's UNet adapter computes it)."""
        i = self._index()
        self._scaled_at = i
        n = self._cond(i, sample.device)[2]
        return (self._flow(i, sample).to(torch.float64) / n).to(sample.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0, generator=None,
             return_dict: bool = True, **kwargs):
        """One step in flow coordinates from the guided model output (see the class docstring)."""
        cfg = self.config
        i = self._index()
        if self._scaled_at != i:
            raise ScheduleError(f"this scheduler was exported for {cfg.pipeline}, whose loop calls scale_model_input "
                                "before every step; a flow pipeline (Flux, SD3) needs a scheduler exported from it")
        if eta:
            raise ScheduleError(f"eta={eta} would add noise the exported schedule does not have; call with eta=0")
        a, b, n = self._cond(i, sample.device)
        sample = self._flow(i, sample)
        x = (sample.to(torch.float64) / n).to(sample.dtype).to(torch.float64)
        out = model_output.to(torch.float64)
        pt = cfg.prediction_type
        if pt == "epsilon":
            x0, eps = (x - b * out) / a, out
        elif pt == "v_prediction":
            x0, eps = a * x - b * out, a * out + b * x
        else:  # "sample"
            x0, eps = out, (x - a * out) / b.clamp(min=1e-12)
        v = (eps - x0).to(sample.dtype)
        tau = torch.tensor(cfg.taus[i], dtype=torch.float32, device=sample.device)
        nxt = torch.tensor(cfg.taus[i + 1], dtype=torch.float32, device=sample.device)
        if cfg.update == "euler":
            prev = (sample.to(torch.float32) + (nxt - tau).to(v.dtype) * v).to(v.dtype)
        else:
            tc = torch.tensor(cfg.cond_taus[i], dtype=torch.float64, device=sample.device)
            x0 = sample.to(torch.float64) - tc * v.to(torch.float64)
            if cfg.clip_sample:
                x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
            noise = None
            if cfg.noise_steps[i]:
                from diffusers.utils.torch_utils import randn_tensor

                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev = ddpm_step(sample, tau.to(torch.float64), nxt.to(torch.float64), x0, noise)
        if i + 1 == self.num_steps:  # back to the layout the source scheduler ends in (the pipeline decodes it)
            prev = (prev.to(torch.float64) * cfg.final_scale).to(prev.dtype)
        self._step_index = i + 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


SCHEDULER_CLASSES = {c.__name__: c for c in (FlowMatchTableScheduler, DiscreteTableScheduler)}


def from_pretrained(path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None):
    """An exported schedule (a folder with ``scheduler_config.json``, or a Hub repo id ``org/name``)
    as a diffusers scheduler: ``pipe.scheduler = tpm.schedulers.from_pretrained(DIR)``."""
    folder = _folder(path, revision, token)
    cfg = _read_config(folder)
    return SCHEDULER_CLASSES[cfg["_class_name"]].from_pretrained(folder)


def _folder(path, revision=None, token=None) -> str:
    from tpm.hub import HubError, is_repo_id, resolve

    key = str(path)
    if os.path.isdir(key):
        return key
    if is_repo_id(key):
        try:
            return resolve(key, revision=revision, token=token, files=(SCHEDULER_CONFIG_NAME, CARD_NAME),
                           kind="tpm schedule")
        except HubError as e:
            raise ScheduleError(f"no local folder {key!r}, and as a Hub repo id: {e}") from None
    raise ScheduleError(f"scheduler folder {key!r} does not exist")


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, SCHEDULER_CONFIG_NAME)
    if not os.path.isfile(path):
        raise ScheduleError(f"{folder} has no {SCHEDULER_CONFIG_NAME}: export one with `tpm export-scheduler` "
                            "or tpm.to_scheduler(...).save_pretrained(DIR)")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("_class_name") not in SCHEDULER_CLASSES:
        raise ScheduleError(f"{path} holds a {cfg.get('_class_name')!r}, not a tpm schedule "
                            f"({', '.join(SCHEDULER_CLASSES)}); load it with diffusers")
    return cfg


def is_scheduler_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a tpm schedule (``scheduler_config.json`` of one of ours)."""
    try:
        _read_config(str(path))
        return True
    except (ScheduleError, OSError, json.JSONDecodeError):
        return False


# ---- the table as a policy (to run it in tpm.sample, tpm compare) -----------------------------------
@dataclass
class ScheduleTableConfig:
    taus: list[float] | None = None  # K+1 update times, taus[0] = the start
    cond_taus: list[float] | None = None  # K told times
    pipeline: str = ""  # the pipeline class the table was exported for
    source_scheduler: str = ""  # UNet pipelines: the scheduler class the table was exported from

    def __post_init__(self):
        if not self.taus or not self.cond_taus or len(self.taus) != len(self.cond_taus) + 1:
            raise PolicyError("schedule_table needs taus (K+1 values) and cond_taus (K values); "
                              "load one with tpm.schedulers.table_policy(DIR)")


@register_policy("schedule_table")
class ScheduleTable(Policy):
    """A fixed per-step table (update time, told time), every token alike: what an exported scheduler
    does, as a policy, so that ``tpm.sample`` and ``tpm compare`` can run it next to others."""

    config_class = ScheduleTableConfig

    def check_backbone(self, backbone) -> None:
        cfg = self.config
        if cfg.pipeline and backbone.pipeline_class_name != cfg.pipeline:
            raise PolicyError(f"this schedule was exported for {cfg.pipeline}, not {backbone.pipeline_class_name}")
        sched = type(backbone.pipe.scheduler).__name__
        if cfg.source_scheduler and sched != cfg.source_scheduler:
            raise PolicyError(f"this schedule was exported from {cfg.source_scheduler}; the pipeline's scheduler is "
                              f"{sched}: pipe.scheduler = {cfg.source_scheduler}.from_config(pipe.scheduler.config)")

    def act(self, state: State) -> Action:
        cfg = self.config
        k = len(cfg.cond_taus)
        if state.num_steps != k:
            raise PolicyError(f"this schedule has {k} steps; sample with num_inference_steps={k} "
                              f"(got {state.num_steps})")
        if state.step == 0 and float((state.tau - cfg.taus[0]).abs().max()) > 1e-6:
            raise PolicyError(f"this schedule starts at time {cfg.taus[0]:.6g}, but the pipeline's grid starts at "
                              f"{float(state.tau.max()):.6g}: it was exported for another scheduler configuration")
        t = state.tau
        nxt = torch.full_like(t, cfg.taus[state.step + 1])
        cond = torch.full_like(t, cfg.cond_taus[state.step])
        return Action(tau_next=nxt, tau_cond=cond)


def table_policy(scheduler_or_path, **hub) -> ScheduleTable:
    """The exported schedule (a scheduler object, a folder or a Hub repo id; ``hub``: ``revision``,
    ``token``) as a :class:`ScheduleTable`."""
    sched = scheduler_or_path
    if not isinstance(sched, _TableScheduler):
        sched = from_pretrained(sched, **hub)
    cfg = sched.config
    if isinstance(sched, FlowMatchTableScheduler):
        return ScheduleTable(taus=list(cfg.sigmas), cond_taus=list(cfg.cond_sigmas), pipeline=cfg.pipeline)
    return ScheduleTable(taus=list(cfg.taus), cond_taus=list(cfg.cond_taus), pipeline=cfg.pipeline,
                         source_scheduler=cfg.source_scheduler)


# ---- tracing a policy ------------------------------------------------------------------------------
@dataclass
class Trace:
    """Per-sample tables of a policy's runs: ``taus`` (S, K+1) and ``cond`` (S, K), float64, with the
    largest spread between the tokens of one sample (0 for uniform fields) and the prompts."""

    taus: torch.Tensor
    cond: torch.Tensor
    token_spread: float
    prompts: list[str]


def trace_policy(pipe, policy: Policy, num_inference_steps: int, prompts, *, seeds=(0,), batch_size: int = 8,
                 **sample_kwargs) -> Trace:
    """Run ``tpm.sample`` with ``policy`` on every (prompt, seed) and record its per-step times.

    Fields are reduced to one value per sample (their mean; ``token_spread`` says whether they were
    uniform). Raises :class:`ScheduleError` for what no table can hold: a known region or a scaled update.
    """
    from tpm.sampler import sample

    if policy.known_region() is not None:
        raise ScheduleError(f"{type(policy).__name__} holds a known region (inpainting / outpainting), which a "
                            "scheduler cannot: a scheduler moves every token alike. Sample it with tpm.sample")
    taus, cond, spread, names = [], [], 0.0, []
    prompts = list(prompts)
    for seed in seeds:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            rows_t: list[torch.Tensor] = []
            rows_c: list[torch.Tensor] = []

            def record(out, rows_t=rows_t, rows_c=rows_c):
                nonlocal spread
                if out.action.step_scale is not None:
                    raise ScheduleError(f"{type(policy).__name__} scales the update step (velocity_scale), which a "
                                        "scheduler's table of times cannot hold")
                if out.step == 0:
                    rows_t.append(out.state.tau.double().flatten(1))
                rows_t.append(out.tau.double().flatten(1))
                rows_c.append(out.tau_cond.double().flatten(1))
                for f in (out.tau, out.tau_cond):
                    flat = f.double().flatten(1)
                    spread = max(spread, float((flat.max(1).values - flat.min(1).values).max()))

            sample(pipe, chunk, policy=policy, num_inference_steps=num_inference_steps, output_type="latent",
                   generator=torch.Generator().manual_seed(int(seed)), callback=record, **sample_kwargs)
            taus.append(torch.stack([r.mean(1) for r in rows_t], 1))
            cond.append(torch.stack([r.mean(1) for r in rows_c], 1))
            names += chunk
    return Trace(torch.cat(taus), torch.cat(cond), spread, names)


# ---- export -------------------------------------------------------------------------------------
def _shift_parameters(pipe, family: str) -> dict[str, Any]:
    """The source scheduler's shift settings, resolved with the pipeline's own defaults."""
    cfg = pipe.scheduler.config
    return {"use_dynamic_shifting": bool(cfg.get("use_dynamic_shifting", False)),
            "base_shift": cfg.get("base_shift", 0.5) if cfg.get("base_shift") is not None else 0.5,
            "max_shift": (cfg.get("max_shift") if cfg.get("max_shift") is not None
                          else (1.15 if family == "FluxPipeline" else 1.16)),
            "base_image_seq_len": cfg.get("base_image_seq_len", 256),
            "max_image_seq_len": cfg.get("max_image_seq_len", 4096)}


def _flux_timestep(c: float) -> float:
    """The float32 timestep T for which FluxPipeline's ``T / 1000`` and the transformer's ``* 1000`` give
    back ``float32(c) * 1000`` bit for bit (tpm tells the transformer exactly that time)."""
    target = torch.tensor(c, dtype=torch.float32) * 1000
    cand = target.clone()
    for _ in range(8):
        if (cand / 1000) * 1000 == target:
            return float(cand)
        cand = torch.nextafter(cand, torch.tensor(math.inf) if (cand / 1000) * 1000 < target else torch.tensor(-math.inf))
    return float(target)


def _flow_scheduler(pipe, backbone, taus: list[float], cond: list[float], grid: tuple[int, int],
                    info: dict) -> FlowMatchTableScheduler:
    family = backbone.pipeline_class_name
    shift = _shift_parameters(pipe, family)
    seq = grid[0] * grid[1]
    mu = None
    if shift["use_dynamic_shifting"]:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = float(calculate_shift(seq, shift["base_image_seq_len"], shift["max_image_seq_len"], shift["base_shift"],
                                   shift["max_shift"]))
    told = [_flux_timestep(c) if family == "FluxPipeline" else float(torch.tensor(c, dtype=torch.float32) * 1000)
            for c in cond]
    return FlowMatchTableScheduler(sigmas=taus, cond_sigmas=cond, timesteps=told, pipeline=family, mu=mu,
                                   image_seq_len=seq, num_train_timesteps=int(pipe.scheduler.config.get(
                                       "num_train_timesteps", 1000)), export_info=info, **shift)


def _unet_scheduler(pipe, backbone, taus: list[float], cond: list[float], info: dict) -> DiscreteTableScheduler:
    from tpm.backbones.discrete import DiscreteTime

    k = len(cond)
    backbone.set_timesteps(k, None)  # the source scheduler's grid and start scale for k steps
    kind = backbone.kind
    sched = pipe.scheduler
    time = DiscreteTime(sched)
    t32 = [torch.tensor(x, dtype=torch.float32).to(torch.float64) for x in cond]
    told = [float(time.timestep(c).to(torch.float32)) for c in t32]
    start = float(backbone._native_scale(torch.tensor(taus[0], dtype=torch.float32)))
    final = float(backbone._native_scale(torch.tensor(taus[-1], dtype=torch.float32)))
    noise_steps = [bool(time.timestep(torch.tensor(t, dtype=torch.float32)) > 0) for t in taus[:-1]]
    cfg = sched.config
    return DiscreteTableScheduler(
        taus=taus, cond_taus=cond, timesteps=told, pipeline=backbone.pipeline_class_name,
        source_scheduler=type(sched).__name__, update="ddpm" if kind == "ddpm" else "euler",
        prediction_type=cfg.prediction_type, init_noise_sigma=float(sched.init_noise_sigma), start_scale=start,
        final_scale=final, tau_max=time.tau_max,
        noise_steps=noise_steps, clip_sample=bool(cfg.get("clip_sample", False)) and kind == "ddpm",
        clip_sample_range=float(cfg.get("clip_sample_range", 1.0)), num_train_timesteps=time.num_train_timesteps,
        export_info=info)


def _policy_label(policy: Policy) -> str:
    return getattr(policy, "source_label", None) or policy.policy_name or type(policy).__name__


def _exportable_backbone(pipe):
    """``pipe``'s backbone adapter, if its family and scheduler have a table form; else :class:`ScheduleError`."""
    from tpm.backbones import get_backbone
    from tpm.backbones.base import BackboneError

    try:
        backbone = get_backbone(pipe)
    except (BackboneError, ValueError) as e:
        raise ScheduleError(str(e)) from None
    family = backbone.pipeline_class_name
    if family not in FLOW_PIPELINES + UNET_PIPELINES:
        raise ScheduleError(f"no scheduler export for {family}; supported: {', '.join(FLOW_PIPELINES + UNET_PIPELINES)}")
    if family in UNET_PIPELINES:
        from tpm.backbones.discrete import SchedulerError, scheduler_kind

        try:  # multistep / higher-order updates have no table form (and no per-pixel one: tpm.sample refuses them)
            scheduler_kind(pipe.scheduler)
        except SchedulerError as e:
            raise ScheduleError(f"cannot export a schedule from this pipeline's scheduler: {e}") from None
    return backbone


def _distilled_table(pipe, policy: Policy, k: int, prompts, seeds, run: dict, label: str, across: float,
                     info: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A state-dependent policy's mean times per step over ``prompts`` x ``seeds`` (recorded in ``info``)."""
    if prompts is None:
        raise ScheduleError(
            f"{label} is state-dependent (its times differ between prompts / noises by up to {across:.3g}), so "
            "no single schedule reproduces it; export its mean table over a prompt set with "
            "to_scheduler(..., prompts=[...]) (CLI: --prompts SET) and measure the cost on held-out prompts")
    prompts = list(prompts)
    tr = trace_policy(pipe, policy, k, prompts, seeds=seeds, **run)
    _refuse_per_token(tr, label)
    info["method"] = (f"distilled: the mean per step of the policy's times over {len(prompts)} prompts x "
                      f"{len(tuple(seeds))} seeds")
    info["train_spread"] = {"tau": float(tr.taus.std(0).max()), "cond": float(tr.cond.std(0).max())}
    return tr.taus.mean(0), tr.cond.mean(0)


def to_scheduler(pipe, policy: Policy, num_inference_steps: int, *, prompts=None, seeds=(0,),
                 test_prompts=None, test_seeds=(0,), reward=None, height: int | None = None, width: int | None = None,
                 guidance_scale: float | None = None, batch_size: int = 8, report=print, **sample_kwargs):
    """``policy`` at ``num_inference_steps`` steps as a diffusers scheduler for ``pipe``'s family.

    After ``pipe.scheduler = to_scheduler(pipe, policy, K)``, ``pipe(prompt, num_inference_steps=K,
    height=..., width=...)`` reproduces ``tpm.sample(pipe, prompt, policy=policy, num_inference_steps=K,
    ...)`` (fp32, to float rounding). ``height`` / ``width`` matter only under dynamic shifting (Flux):
    the schedule is made for, and checked against, that image size. ``guidance_scale`` (default: the
    pipeline's) is applied as the pipeline takes it (``Backbone.sample_kwargs``); other keywords go
    to ``tpm.sample``.

    State-free policies (synchronous, shifted_grid, dm_concave, constant_deviation, a field policy
    whose action does not depend on the state) are exported exactly: they are run on two probe
    prompts with different noise, and their per-step times must agree. A state-dependent policy
    needs ``prompts``: its table is then the mean, per step, of its times over ``prompts`` x
    ``seeds`` (a distillation). With ``test_prompts`` the distillation's held-out cost is measured
    there (mean |policy - table| of the times; with ``reward(images, prompts) -> scores``, the
    reward of the policy and of its table from the same noise, paired bootstrap interval) and
    passed to ``report`` (default ``print``; ``None`` = silent) and the model card.
    Per-token fields (AsynDM), known regions and scaled updates raise :class:`ScheduleError`.
    """
    backbone = _exportable_backbone(pipe)
    family = backbone.pipeline_class_name
    k = int(num_inference_steps)
    if k < 1:
        raise ScheduleError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    height, width = backbone.resolve_size(height, width)
    # CFG as the pipeline's plain call applies it (true CFG for a Flux without guidance embedding);
    # an explicit guidance_scale wins over CFG keywords in sample_kwargs, which win over the default.
    cfg_kwargs = backbone.sample_kwargs(guidance_scale)
    run = {"height": height, "width": width, "batch_size": batch_size,
           **({**cfg_kwargs, **sample_kwargs} if guidance_scale is None else {**sample_kwargs, **cfg_kwargs})}
    label = _policy_label(policy)
    probe = trace_policy(pipe, policy, k, PROBE_PROMPTS, seeds=(0, 1), **run)
    _refuse_per_token(probe, label)
    across = float((probe.taus - probe.taus[:1]).abs().max().maximum((probe.cond - probe.cond[:1]).abs().max()))
    info: dict[str, Any] = {"source": label, "source_config": _config_of(policy), "model": _model_label(pipe),
                            "pipeline": family, "steps": k, "size": f"{width}x{height}",
                            "guidance_scale": guidance_scale}
    if across == 0:
        taus, cond = probe.taus[0], probe.cond[0]
        info["method"] = ("exact: the policy's times did not depend on the state (two probe prompts with "
                          "different noise gave identical tables)")
    else:
        taus, cond = _distilled_table(pipe, policy, k, prompts, seeds, run, label, across, info)
    taus_l = [float(x) for x in taus.to(torch.float32)]
    cond_l = [float(x) for x in cond.to(torch.float32)]
    if family in FLOW_PIPELINES:
        sched = _flow_scheduler(pipe, backbone, taus_l, cond_l, backbone.grid(height, width), info)
    else:
        sched = _unet_scheduler(pipe, backbone, taus_l, cond_l, info)
    if across != 0 and test_prompts is not None:
        info["heldout"] = heldout_cost(pipe, policy, sched, k, list(test_prompts), seeds=test_seeds, reward=reward,
                                       **run)
        sched.register_to_config(export_info=info)
        if report is not None:
            report(heldout_line(info))
    return sched


def _refuse_per_token(trace: Trace, label: str) -> None:
    if trace.token_spread > 0:
        raise ScheduleError(
            f"{label} gives tokens of one image different times (a per-token field, spread up to "
            f"{trace.token_spread:.3g}); a scheduler tells every token the same time, so it cannot be exported "
            "as one. Sample it with tpm.sample")


def _config_of(policy: Policy) -> dict:
    try:
        cfg = policy.config_dict()
        json.dumps(cfg)
        return cfg
    except (TypeError, ValueError, AttributeError):
        return {"policy": _policy_label(policy)}


def _model_label(pipe) -> str:
    return str(getattr(pipe, "name_or_path", None) or type(pipe).__name__)


def heldout_cost(pipe, policy: Policy, scheduler, num_inference_steps: int, prompts: list[str], *, seeds=(0,),
                 reward=None, batch_size: int = 8, num_resamples: int = 10_000, **sample_kwargs) -> dict:
    """What distilling ``policy`` into ``scheduler``'s table costs on held-out ``prompts``.

    Always: the mean and largest |policy time - table time| over samples and steps (update and told
    times). With ``reward(images, prompts) -> scores``: both rewards from the same noise (the
    table run through ``tpm.sample`` as a :class:`ScheduleTable`, which equals the stock pipeline
    with the scheduler), and table - policy with a paired bootstrap interval over prompts
    (:func:`tpm.comparison.stats.paired_bootstrap`).
    """
    table = table_policy(scheduler)
    tr = trace_policy(pipe, policy, num_inference_steps, prompts, seeds=seeds, batch_size=batch_size, **sample_kwargs)
    t_ref = torch.tensor(table.config.taus, dtype=torch.float64)
    c_ref = torch.tensor(table.config.cond_taus, dtype=torch.float64)
    gap_t, gap_c = (tr.taus - t_ref).abs(), (tr.cond - c_ref).abs()
    out: dict[str, Any] = {"prompts": len(prompts), "seeds": len(tuple(seeds)),
                           "tau_gap": {"mean": float(gap_t.mean()), "max": float(gap_t.max())},
                           "cond_gap": {"mean": float(gap_c.mean()), "max": float(gap_c.max())}}
    if reward is not None:
        out.update(reward_pair(pipe, policy, table, num_inference_steps, prompts, seeds=seeds, reward=reward,
                               batch_size=batch_size, num_resamples=num_resamples, **sample_kwargs))
    return out


def reward_pair(pipe, policy: Policy, table: Policy, num_inference_steps: int, prompts: list[str], *, seeds, reward,
                batch_size: int = 8, num_resamples: int = 10_000, **sample_kwargs) -> dict:
    """Rewards of ``policy`` and ``table`` on every (prompt, seed) from the same noise, and table - policy
    with a paired bootstrap interval clustered by prompt."""
    from tpm.comparison.stats import bootstrap_mean, paired_bootstrap
    from tpm.sampler import sample

    scores = {"policy": [], "table": []}
    groups = []
    for seed in seeds:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            for name, pol in (("policy", policy), ("table", table)):
                images = sample(pipe, chunk, policy=pol, num_inference_steps=num_inference_steps,
                                generator=torch.Generator().manual_seed(int(seed)), **sample_kwargs).images
                scores[name] += [float(s) for s in reward(images, chunk)]
            groups += list(range(start, start + len(chunk)))
    p, t = np.asarray(scores["policy"]), np.asarray(scores["table"])
    diff = paired_bootstrap(t, p, groups, num_resamples=num_resamples)
    mean_p = bootstrap_mean(p, groups, num_resamples=num_resamples)
    mean_t = bootstrap_mean(t, groups, num_resamples=num_resamples)
    return {"reward": getattr(reward, "name", None) or type(reward).__name__,
            "policy": _interval(mean_p), "table": _interval(mean_t), "table_minus_policy": _interval(diff)}


def _interval(iv) -> dict:
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high, "n": iv.n}


def heldout_line(info: dict) -> str:
    """One line: the distillation's held-out cost (what :func:`to_scheduler` reports)."""
    h = info["heldout"]
    line = (f"distilled {info['source']} into a {info['steps']}-step schedule; held out ({h['prompts']} prompts x "
            f"{h['seeds']} seeds): |policy - table| update time mean {h['tau_gap']['mean']:.4f} (max "
            f"{h['tau_gap']['max']:.4f}), told time mean {h['cond_gap']['mean']:.4f} (max {h['cond_gap']['max']:.4f})")
    if "reward" in h:
        d = h["table_minus_policy"]
        line += (f"; {h['reward']}: policy {h['policy']['estimate']:.4f}, table {h['table']['estimate']:.4f}, "
                 f"table - policy {d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]")
    return line


# ---- the model card ---------------------------------------------------------------------------------
def scheduler_card(sched: _TableScheduler) -> str:
    """``README.md`` of an exported schedule: how to use it, the table, its source, how it was measured."""
    cfg = sched.config
    info = dict(cfg.export_info or {})
    flow = isinstance(sched, FlowMatchTableScheduler)
    update = list(cfg.sigmas) if flow else list(cfg.taus)
    told = list(cfg.cond_sigmas) if flow else list(cfg.cond_taus)
    k = len(told)
    cls = type(sched).__name__
    dynamic = flow and cfg.mu is not None
    w, _, h = str(info.get("size", "")).partition("x")
    size_args = f", height={h}, width={w}" if dynamic and h else ""
    lines = ["---", "library_name: diffusers", "tags:", "- tpm", "- scheduler", "- timestep-policy", "---", "",
             f"# A `tpm` schedule for `{cfg.pipeline}` ({k} steps)", "",
             f"Exported by `tpm` from the policy `{info.get('source', '?')}` on model `{info.get('model', '?')}` at "
             f"{info.get('size', '?')} pixels. It is a diffusers scheduler (`{cls}`): the unchanged pipeline runs it.",
             "", "```python", "import tpm.schedulers",
             "pipe.scheduler = tpm.schedulers.from_pretrained(DIR)   # this folder (or its Hub repo id)",
             f"image = pipe(prompt, num_inference_steps={k}{size_args}).images[0]", "```", "",
             "Another step count or pipeline family"
             + (", or another image size (this schedule includes the dynamic shift of its size)" if dynamic else "")
             + " raises an error instead of running a different schedule.", "",
             "## How it was made", "", f"- {info.get('method', 'unknown')}."]
    if info.get("train_spread"):
        s = info["train_spread"]
        lines.append(f"- Largest per-step standard deviation of the policy's times over those runs: update "
                     f"{s['tau']:.4f}, told {s['cond']:.4f}.")
    if info.get("guidance_scale") is not None:
        lines.append(f"- Guidance scale during export: {info['guidance_scale']}.")
    h = info.get("heldout")
    if h:
        lines += ["", "## Held-out cost of the distillation", "", heldout_line(info) + ".", ""]
        if "reward" in h:
            lines += ["| | mean [95 % CI] |", "|---|---|"]
            for key, name in (("policy", "policy (tpm.sample)"), ("table", "this schedule"),
                              ("table_minus_policy", "schedule - policy (paired)")):
                iv = h[key]
                lines.append(f"| {name} | {iv['estimate']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}] |")
    elif "distilled" in str(info.get("method", "")):
        lines += ["", "Held-out cost: not measured (export with test prompts to measure it)."]
    lines += ["", "## The table", "",
              "Times are tpm's flow time (1 = noise, 0 = clean); `timestep` is what the denoiser is told.", "",
              "| step | from | to | told | timestep |", "|---|---|---|---|---|"]
    for i in range(k):
        lines.append(f"| {i} | {update[i]:.6f} | {update[i + 1]:.6f} | {told[i]:.6f} | {cfg.timesteps[i]:.4f} |")
    cfg_src = info.get("source_config")
    if cfg_src:
        lines += ["", "## Source policy", "", "```json", json.dumps(cfg_src, indent=1, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"

