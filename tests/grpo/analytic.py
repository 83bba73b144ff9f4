"""An analytic backbone whose final image is a known function of the policy's actions.

The "model" predicts the clean image ``x0_hat(tau_c) = tau_c * P`` (a fixed pattern P scaled by the
time it is told) and returns the flow-matching velocity ``v = (x - x0_hat) / tau_c``; latents start
at zero instead of noise, so nothing is random but the policy's draws. With the denoiser told the
truth (``tau_c = tau``), one Euler step to 0 lands exactly on ``x0_hat``: after two steps the image
is ``tau_1 * P`` per token, the time field the policy chose at the first step. With AsyncDiff's
pseudo-timestep instead, the image is a monotone function of the TPM's r. A reward that pays for
one target image therefore has a known optimal action, which lets the tests check that GRPO finds
it.
"""

from __future__ import annotations

import torch

from tpm.backbones.base import Backbone, Conditioning, Prediction

TEXT_DIM = 8


class AnalyticBackbone(Backbone):
    """Tokens (B, N, C) on an h x w grid; ``decode_images`` returns them as a (B, C, h, w) "image"."""

    def __init__(self, grid=(4, 4), channels: int = 4, seed: int = 0):
        self.pipe = self
        self.transformer = None
        self.time_resolution = None
        self.h, self.w = grid
        self.channels = channels
        g = torch.Generator().manual_seed(seed)
        self.pattern = 0.5 + torch.rand(1, self.h * self.w, channels, generator=g)  # P, bounded away from 0

    # geometry
    @property
    def token_size(self) -> int:
        return 1

    def default_size(self) -> int:
        return self.h

    def resolve_size(self, height, width):
        return self.h, self.w

    def call_default(self, name):
        return {"num_inference_steps": 2, "guidance_scale": 1.0}.get(name)

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32

    @property
    def num_attention_layers(self) -> int:
        return 0

    def to_tokens(self, latents):
        return latents

    def from_tokens(self, tokens, grid):
        return tokens

    def expand_field(self, field):
        return field.reshape(field.shape[0], -1, 1)

    # pipeline steps
    def encode(self, prompts, guidance_scale, negative_prompt=None, max_sequence_length=None, **kwargs):
        embeds = torch.stack([torch.full((3, TEXT_DIM), float(len(p) % 7) / 7) for p in prompts])
        return Conditioning(prompts=list(prompts), embeds=embeds, pooled=embeds.mean(1), guidance_scale=1.0,
                            do_cfg=False, extras={"max_sequence_length": 3})

    def prepare_latents(self, batch_size, height, width, generator=None, latents=None):
        return torch.zeros(batch_size, self.h * self.w, self.channels)

    def set_timesteps(self, num_inference_steps, latents, sigmas=None):
        s = torch.linspace(1, 0, num_inference_steps + 1)
        return s, s[:-1] * 1000

    def _set_timesteps(self, num_inference_steps, latents, sigmas):
        raise NotImplementedError

    def predict(self, latents, tau, cond, attention_layers=None) -> Prediction:
        tc = self.expand_field(tau).to(latents.dtype)
        x0_hat = tc * self.pattern
        return Prediction((latents - x0_hat) / tc)

    @property
    def token_dim(self) -> int:
        return self.channels

    @property
    def text_dim(self) -> int:
        return TEXT_DIM

    @property
    def pooled_dim(self) -> int:
        return TEXT_DIM

    def sample_kwargs(self, scale=None):
        return {}

    def decode_images(self, latents, height, width, output_type="pil"):
        b = latents.shape[0]
        return (latents / self.pattern).transpose(1, 2).reshape(b, self.channels, self.h, self.w)

    def text_words(self, prompts, max_sequence_length):
        return [[-1] * max_sequence_length for _ in prompts]
