"""SD 1.5 / 2.1 (``StableDiffusionPipeline``) and SDXL (``StableDiffusionXLPipeline``) with per-pixel time.

The UNet is a discrete-time (DDPM-family) model; tpm's sampler and policies work with a flow
time ``tau`` in [0, 1]. :mod:`tpm.backbones.discrete` gives the exact map: the sampler holds
*flow latents* ``y = x_t / (a_t + b_t)`` (this adapter's native layout), a pixel at ``tau`` is the
UNet's pixel at ``abar(tau)`` and timestep ``t(tau)`` from the scheduler's own table, and the
adapter returns the velocity ``eps_hat - x0_hat`` of the model's estimates (epsilon, v or sample
prediction). Then the sampler's per-token Euler step *is* DDIM with eta = 0 (AsynDM Eq. 14-15) and
Euler-discrete, per pixel; with ``DDPMScheduler`` the update is the ancestral per-pixel DDPM step
(AsynDM Eq. 4-5). :meth:`start` turns the pipeline's initial latents (scheduler layout: VP for
DDIM / DDPM, VE for Euler) into flow latents and :meth:`finish` turns the final ones back, so the
decode is the pipeline's.

The grid ``sigmas`` handed to policies is the scheduler's own: ``tau`` of each timestep's
``alphas_cumprod`` and, last, of the value the scheduler ends on (DDIM's ``final_alpha_cumprod``,
so with ``set_alpha_to_one=False`` the last grid time is small but not 0, as in the pipeline).

Guidance is the pipeline's (on the model output, batch [negative, positive]); SDXL's
``add_time_ids`` (original size, crop, target size) and pooled text embeddings are built as
``StableDiffusionXLPipeline.__call__`` builds them. Cross-attention maps come from the ``attn2``
layers at 1/4 of the latent resolution (:mod:`tpm.backbones.unet_forward`); their indices are
what ``attention_layers`` refers to. Tokens are single latent pixels (patch size 1).
Not supported here: ``guidance_rescale``, IP-adapters, ControlNet residuals.
"""

from __future__ import annotations

import torch

from tpm.backbones.base import Backbone, BackboneError, Conditioning, Prediction, guided, word_index_of_tokens
from tpm.backbones.discrete import (
    SUPPORTED_SCHEDULERS,
    DiscreteTime,
    SchedulerError,
    coefficients,
    ddpm_step,
    scheduler_kind,
    tau_from_alpha_bar,
)
from tpm.backbones.unet_forward import asyndm_layers, check_unet, unet_forward


class StableDiffusionBackbone(Backbone):
    """Adapter for ``diffusers.StableDiffusionPipeline`` (SD 1.x / 2.x, epsilon or v-prediction)."""

    pipeline_class_name = "StableDiffusionPipeline"
    native_flow = False

    def __init__(self, pipe, time_resolution: float | None = None, time_levels: int | None = None):
        self.pipe = pipe
        self.transformer = pipe.unet  # "the denoiser": widths and dtype are read from it
        self.unet = pipe.unet
        self.time_resolution = time_resolution
        self.time_levels = time_levels
        try:
            check_unet(self.unet)
        except ValueError as e:
            raise BackboneError(str(e)) from None
        self._generator = None
        self._kind: str | None = None
        self._time: DiscreteTime | None = None

    # ---- geometry -------------------------------------------------------------------------
    @property
    def token_size(self) -> int:
        return self.pipe.vae_scale_factor

    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.pipe.vae_scale_factor

    @property
    def num_attention_layers(self) -> int:
        return len(asyndm_layers(self.unet))

    def default_attention_layers(self) -> list[int]:
        # AsynDM App. B.3 averages every cross-attention layer at 1/4 of the latent resolution.
        return list(range(self.num_attention_layers))

    def to_tokens(self, latents):
        b, c, h, w = latents.shape
        return latents.permute(0, 2, 3, 1).reshape(b, h * w, c)

    def from_tokens(self, tokens, grid):
        b, n, c = tokens.shape
        return tokens.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)

    def expand_field(self, field):
        return field[:, None]

    @property
    def token_dim(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def text_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def pooled_dim(self) -> int:
        return self.text_dim

    # ---- scheduler ------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """"ddim", "euler" or "ddpm": how the pipeline's scheduler is applied per pixel."""
        try:
            return scheduler_kind(self.pipe.scheduler)
        except SchedulerError as e:
            raise BackboneError(str(e)) from None

    @property
    def euler_update(self) -> bool:
        """Whether the update is the sampler's Euler step (DDIM, Euler), not DDPM's ancestral step."""
        return self.kind != "ddpm"

    def set_timesteps(self, num_inference_steps: int, latents: torch.Tensor, sigmas=None):
        if sigmas is not None:
            raise BackboneError("custom sigmas are not supported for UNet pipelines")
        if num_inference_steps < 1:
            raise BackboneError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        kind = self.kind
        sched = self.pipe.scheduler
        sched.set_timesteps(num_inference_steps, device=self.device)
        self._kind, self._time = kind, DiscreteTime(sched)
        timesteps = sched.timesteps
        if kind == "euler":
            grid = sched.sigmas.to(torch.float64)
            taus = grid / (1 + grid)
        else:
            abar = sched.alphas_cumprod.to(torch.float64)
            ts = timesteps.long().cpu()
            prev = [int(t) - sched.config.num_train_timesteps // num_inference_steps for t in ts]
            if kind == "ddpm" and getattr(sched, "custom_timesteps", False):
                prev = [int(x) for x in ts[1:]] + [-1]
            # The grid is one field per step only if each step lands on the next step's timestep.
            if any(p != int(n) for p, n in zip(prev[:-1], ts[1:])):
                raise BackboneError(
                    f"{type(sched).__name__} with timestep_spacing={sched.config.get('timestep_spacing')!r} steps "
                    "to timesteps it does not evaluate next, which no per-pixel grid represents; use "
                    "timestep_spacing='leading' or 'trailing'")
            final = getattr(sched, "final_alpha_cumprod", torch.tensor(1.0)) if kind == "ddim" else torch.tensor(1.0)
            last = abar[prev[-1]] if prev[-1] >= 0 else final.to(torch.float64)
            taus = torch.cat([tau_from_alpha_bar(abar[ts]), tau_from_alpha_bar(last.reshape(1))])
        # Our timestep map must give back the scheduler's own timesteps on its grid.
        mapped = self._time.timestep(taus[:-1].float().to(torch.float64))
        err = float((mapped.cpu() - timesteps.cpu().to(torch.float64)).abs().max())
        if err > 1e-2:
            raise BackboneError(f"{type(sched).__name__}'s timesteps do not follow its sigma table (max "
                                f"difference {err:.3g}); use the default sigma settings or DDIMScheduler")
        return taus.to(torch.float32), timesteps

    def _set_timesteps(self, num_inference_steps, latents, sigmas):  # pragma: no cover - set_timesteps overridden
        raise NotImplementedError

    def _native_scale(self, tau: torch.Tensor) -> torch.Tensor:
        """Scheduler latents = flow latents * this, per pixel (VP: 1/n; VE: 1/(1 - tau))."""
        tau = tau.to(torch.float64)
        if self._kind == "euler":
            return 1 / (1 - tau).clamp(min=1e-12)
        return 1 / coefficients(tau)[2]

    def start(self, latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return (latents.to(torch.float64) / self._native_scale(sigmas[0])).to(latents.dtype)

    def finish(self, latents: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        scale = self._native_scale(self.expand_field(tau).to(latents.device))
        return (latents.to(torch.float64) * scale).to(latents.dtype)

    # ---- pipeline steps -------------------------------------------------------------------
    def encode(self, prompts, guidance_scale, negative_prompt=None, max_sequence_length=None, **kwargs):
        do_cfg = guidance_scale > 1
        embeds, n_embeds = self.pipe.encode_prompt(prompts, self.device, 1, do_cfg, negative_prompt=negative_prompt)
        pooled = self._pooled(prompts, embeds)
        n_pooled = self._pooled([""] * len(prompts), n_embeds) if n_embeds is not None else None
        return Conditioning(prompts=list(prompts), embeds=embeds, pooled=pooled, guidance_scale=guidance_scale,
                            do_cfg=do_cfg, negative_embeds=n_embeds, negative_pooled=n_pooled,
                            extras={"max_sequence_length": self.pipe.tokenizer.model_max_length})

    def _pooled(self, prompts, embeds):
        """CLIP's pooled output: the final hidden state at each prompt's end-of-text token."""
        tok = self.pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        eos = tok.eos_token_id
        pos = torch.where((ids == eos).any(1), (ids == eos).int().argmax(1), ids.argmax(1))
        return embeds[torch.arange(len(prompts)), pos.to(embeds.device)]

    def prepare_latents(self, batch_size, height, width, generator=None, latents=None):
        self._generator = generator  # DDPM draws its per-step noise from it, as the pipeline does
        return self.pipe.prepare_latents(batch_size, self.unet.config.in_channels, height, width, self.dtype,
                                         self.device, generator, latents)

    def _unet_inputs(self, cond: Conditioning, latents: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        embeds = torch.cat([cond.negative_embeds, cond.embeds]) if cond.do_cfg else cond.embeds
        return embeds, None

    def predict(self, latents, tau, cond, attention_layers=None, attention_tokens=None) -> Prediction:
        # attention_tokens is not needed: cross-attention over <= 77 text tokens costs little, so
        # every token's map is computed.
        if self._time is None:  # predict before any set_timesteps (training, tests): the table needs none
            self._kind, self._time = self.kind, DiscreteTime(self.pipe.scheduler)
        tau64 = tau.to(torch.float64).clamp(0, self._time.tau_max)
        a, b, n = (c[:, None] for c in coefficients(tau64))
        t = self._time.timestep(tau64)
        x = (latents.to(torch.float64) / n).to(latents.dtype)  # the UNet's input x_t (VP)
        embeds, added = self._unet_inputs(cond, latents)
        x_in, t_in = (torch.cat([x, x]), torch.cat([t, t])) if cond.do_cfg else (x, t)
        capture = attention_layers is not None
        # Conditioning timesteps on the per-pixel path: whole training timesteps by default, or
        # multiples of time_resolution (in tau units, like the DiT adapters) of the training range.
        grid = 1.0 if self.time_resolution is None else self.time_resolution * self._time.num_train_timesteps
        out, maps = unet_forward(self.unet, x_in, t_in, embeds, added, capture=capture, layers=attention_layers,
                                 time_grid=grid, time_levels=self.time_levels)
        if cond.do_cfg:
            out, maps = guided(out, maps, cond.guidance_scale)
        x0, eps = self._estimates(out.to(torch.float64), x.to(torch.float64), a, b)
        v = (eps - x0).to(latents.dtype)
        return Prediction(v, maps)

    def _estimates(self, out, x, a, b):
        """(x0, eps) from the model output at VP input ``x`` (the scheduler's formulas)."""
        pt = self.pipe.scheduler.config.prediction_type
        if pt == "epsilon":
            return (x - b * out) / a, out
        if pt == "v_prediction":
            return a * x - b * out, a * out + b * x
        return out, (x - a * out) / b.clamp(min=1e-12)  # "sample"

    def update(self, latents, tau, tau_cond, action, v):
        if self._kind != "ddpm":
            return super().update(latents, tau, tau_cond, action, v)
        if action.step_scale is not None:
            raise BackboneError("this policy scales the update step, which has no meaning for the ancestral "
                                "DDPM update; use DDIMScheduler")
        tc = self.expand_field(tau_cond).to(torch.float64)
        x0 = latents.to(torch.float64) - tc * v.to(torch.float64)
        cfg = self.pipe.scheduler.config
        if cfg.get("clip_sample", False):
            r = cfg.get("clip_sample_range", 1.0)
            x0 = x0.clamp(-r, r)
        t_now = self._time.timestep(tau.to(torch.float64))
        noise = None
        if bool((t_now > 0).any()):
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(latents.shape, generator=self._generator, device=latents.device, dtype=latents.dtype)
        return ddpm_step(latents, self.expand_field(tau).to(torch.float64),
                         self.expand_field(action.tau_next).to(torch.float64), x0, noise)

    def _vae_normalisation(self) -> tuple[float, float]:
        return self.pipe.vae.config.scaling_factor, 0.0

    def text_words(self, prompts, max_sequence_length):
        tok = self.pipe.tokenizer
        return [word_index_of_tokens(tok, p, tok.model_max_length) for p in prompts]


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """Adapter for ``diffusers.StableDiffusionXLPipeline`` (two CLIP encoders, added time ids)."""

    pipeline_class_name = "StableDiffusionXLPipeline"

    @property
    def pooled_dim(self) -> int:
        enc = self.pipe.text_encoder_2
        return int(enc.config.projection_dim) if enc is not None else self.text_dim

    def encode(self, prompts, guidance_scale, negative_prompt=None, max_sequence_length=None, **kwargs):
        do_cfg = guidance_scale > 1
        embeds, n_embeds, pooled, n_pooled = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt)
        tok = self.pipe.tokenizer or self.pipe.tokenizer_2
        return Conditioning(prompts=list(prompts), embeds=embeds, pooled=pooled, guidance_scale=guidance_scale,
                            do_cfg=do_cfg, negative_embeds=n_embeds, negative_pooled=n_pooled,
                            extras={"max_sequence_length": tok.model_max_length})

    def prepare_latents(self, batch_size, height, width, generator=None, latents=None):
        self._size = (height, width)
        return super().prepare_latents(batch_size, height, width, generator, latents)

    def _unet_inputs(self, cond, latents):
        # StableDiffusionXLPipeline.__call__: original size = target size = the image size, no crop.
        h, w = latents.shape[-2] * self.token_size, latents.shape[-1] * self.token_size
        proj = int(cond.pooled.shape[-1]) if self.pipe.text_encoder_2 is None else self.pipe.text_encoder_2.config.projection_dim
        ids = self.pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=cond.embeds.dtype,
                                          text_encoder_projection_dim=proj).to(latents.device)
        b = cond.batch_size
        if cond.do_cfg:
            embeds = torch.cat([cond.negative_embeds, cond.embeds])
            text = torch.cat([cond.negative_pooled, cond.pooled])
            ids = ids.repeat(2 * b, 1)
        else:
            embeds, text, ids = cond.embeds, cond.pooled, ids.repeat(b, 1)
        return embeds, {"text_embeds": text, "time_ids": ids}

    def _vae_normalisation(self) -> tuple[float, float]:
        cfg = self.pipe.vae.config
        if getattr(cfg, "latents_mean", None) is not None:
            raise BackboneError("VAEs with latents_mean / latents_std are not supported yet")
        return cfg.scaling_factor, 0.0

    def text_words(self, prompts, max_sequence_length):
        tok = self.pipe.tokenizer or self.pipe.tokenizer_2
        return [word_index_of_tokens(tok, p, tok.model_max_length) for p in prompts]


__all__ = ["SUPPORTED_SCHEDULERS", "StableDiffusionBackbone", "StableDiffusionXLBackbone"]
