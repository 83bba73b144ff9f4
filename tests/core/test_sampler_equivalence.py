"""``tpm.sample(pipe, ..., policy=None)`` reproduces ``pipe(...)``.

Same arguments and generator seed on both sides; fp32. ``max_sequence_length=16`` is passed to
both calls because the tiny pipelines' ``tpm_defaults`` only reach ``tpm.sample``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import policies
import tpm

from .helpers import shared_pipeline

PROMPTS = ["a red circle left of a blue square", "two dogs riding a bike on the beach"]
TOL = 1e-4

# (steps, guidance, number of prompts, (height, width), output_type): a covering set of the
# step counts 1/3/4, guidance 1 and 5, batch 1 and 2, 32x32 and 32x48, latents and images.
CASES = [
    (1, 1.0, 1, (32, 32), "latent"),
    (3, 5.0, 2, (32, 48), "latent"),
    (4, 5.0, 1, (32, 48), "np"),
    (4, 1.0, 2, (32, 32), "np"),
]
PIPES = ["flux", "flux_guidance", "sd3", "sd35"]


def _as_array(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().cpu().numpy()
    return np.asarray(images)


def _both(pipe, prompts, seed=0, **kwargs):
    """(pipe(...), tpm.sample(..., policy=None)) with the same arguments and seed."""
    ref = pipe(prompts, generator=torch.Generator().manual_seed(seed), max_sequence_length=16, **kwargs).images
    out = tpm.sample(pipe, prompts, policy=None, generator=torch.Generator().manual_seed(seed),
                     max_sequence_length=16, **kwargs).images
    return _as_array(ref), _as_array(out)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[0]}-g{c[1]}-b{c[2]}-{c[3][0]}x{c[3][1]}-{c[4]}")
@pytest.mark.parametrize("name", PIPES)
def test_synchronous_equals_pipeline(name, case):
    steps, guidance, n, (height, width), output_type = case
    pipe = shared_pipeline(name)
    ref, out = _both(pipe, PROMPTS[:n], num_inference_steps=steps, guidance_scale=guidance, height=height,
                     width=width, output_type=output_type)
    assert ref.shape == out.shape
    if output_type == "np":
        assert ref.shape == (n, height, width, 3)
    assert np.abs(ref - out).max() <= TOL


def test_flux_true_cfg_equals_pipeline(flux_pipe):
    kwargs = dict(num_inference_steps=3, guidance_scale=3.5, height=32, width=32, output_type="latent",
                  negative_prompt="a blue square", true_cfg_scale=4.0)
    ref, out = _both(flux_pipe, PROMPTS, **kwargs)
    assert np.abs(ref - out).max() <= TOL
    # The negative branch matters: without it the result differs.
    plain = _as_array(tpm.sample(flux_pipe, PROMPTS, num_inference_steps=3, guidance_scale=3.5, height=32,
                                 width=32, output_type="latent", max_sequence_length=16,
                                 generator=torch.Generator().manual_seed(0)).images)
    assert np.abs(plain - out).max() > 1e-3


@pytest.mark.parametrize("negative", ["a green car", ["a green car", "a cat"]], ids=["str", "list"])
def test_sd3_negative_prompt_equals_pipeline(sd3_pipe, negative):
    ref, out = _both(sd3_pipe, PROMPTS, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                     output_type="latent", negative_prompt=negative)
    assert np.abs(ref - out).max() <= TOL


@pytest.mark.parametrize("name", ["flux", "sd35"])
def test_synchronous_policy_equals_none(name):
    pipe = shared_pipeline(name)
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=48, output_type="latent",
                  max_sequence_length=16)
    a = tpm.sample(pipe, PROMPTS, policy=None, generator=torch.Generator().manual_seed(1), **kwargs)
    b = tpm.sample(pipe, PROMPTS, policy=policies.Synchronous(), generator=torch.Generator().manual_seed(1),
                   return_trajectory=True, **kwargs)
    assert torch.equal(a.images, b.images)
    traj = b.trajectory
    assert traj.num_steps == 3 and len(traj.tau) == 4
    for k, tau in enumerate(traj.tau):  # every token on the pipeline's grid
        assert torch.all(tau == traj.sigmas[k])
    # A different seed gives a different sample (the comparison above can fail).
    c = tpm.sample(pipe, PROMPTS, generator=torch.Generator().manual_seed(2), **kwargs)
    assert (c.images - a.images).abs().max() > 1e-3


def test_default_max_sequence_length_from_tpm_defaults(flux_pipe):
    """Without the argument, tpm.sample uses the pipeline's ``tpm_defaults`` (16)."""
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    a = tpm.sample(flux_pipe, PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images
    b = flux_pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), max_sequence_length=16, **kwargs).images
    assert (a - b).abs().max() <= TOL


def test_generator_per_prompt_and_pil_output(flux_guidance_pipe):
    pipe = flux_guidance_pipe
    kwargs = dict(num_inference_steps=2, guidance_scale=3.5, height=32, width=32, max_sequence_length=16)
    ref = pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (4, 5)], **kwargs).images
    out = tpm.sample(pipe, PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (4, 5)], **kwargs).images
    assert len(ref) == len(out) == 2 and out[0].size == (32, 32)
    for a, b in zip(ref, out):  # PIL images, 8-bit: equal pixels
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sd3_without_t5_equals_pipeline():
    from tpm.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(with_t5=False)
    ref, out = _both(pipe, PROMPTS, num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                     output_type="latent")
    assert np.abs(ref - out).max() <= TOL


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_bfloat16_equals_pipeline(name):
    """Also bit for bit in bf16: the Euler product dt * v is taken in v's dtype, like the scheduler's."""
    from .helpers import build_pipeline

    pipe = build_pipeline(name).to(torch.bfloat16)
    # 3 and 4 steps: grid times that bf16 cannot represent (1 step would hide the difference)
    for steps in (3, 4):
        kwargs = dict(num_inference_steps=steps, guidance_scale=5.0, height=32, width=32, output_type="latent",
                      max_sequence_length=16)
        ref = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
        out = tpm.sample(pipe, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
        assert ref.dtype == out.dtype == torch.bfloat16
        assert torch.equal(ref, out)
