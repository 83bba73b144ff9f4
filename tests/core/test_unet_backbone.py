"""UNet pipelines (SD 1.x / 2.x, SDXL): per-pixel time, DDIM / Euler / DDPM per pixel, maps, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tpm
from tpm.backbones import BackboneError, get_backbone
from tpm.backbones.discrete import DiscreteTime, coefficients, ddpm_step, tau_from_alpha_bar
from tpm.backbones.unet_forward import asyndm_layers, cross_attention_layers, unet_forward
from tpm.testing import compare_to_pipeline, sd_scheduler, tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a red circle left of a blue square", "two green triangles"]
# fp32 tolerance: tpm steps in flow coordinates (float64 coefficients) and the pipeline in its
# scheduler's; the two differ by rounding only. Images are in [0, 1]; latents are compared relative
# to their size (random tiny UNets blow latents up to tens).
TOL = 1e-5

# (pipeline class, scheduler, prediction type): DDIM for both classes and both prediction types,
# and each class's default scheduler where it is deterministic (SDXL: Euler; SD 1.5's PNDM is
# multistep and rejected, see test_multistep_scheduler_is_refused).
CASES = [
    ("sd", "ddim", "epsilon"),
    ("sd", "ddim", "v_prediction"),
    ("sd", "euler", "epsilon"),
    ("sdxl", "euler", "epsilon"),
    ("sdxl", "ddim", "v_prediction"),
    ("sd", "ddpm", "epsilon"),
]


def _pipe(kind: str, scheduler: str, prediction: str):
    build = tiny_sd_pipeline if kind == "sd" else tiny_sdxl_pipeline
    return build(prediction_type=prediction, scheduler=scheduler)


@pytest.mark.parametrize("kind,scheduler,prediction", CASES)
def test_synchronous_equals_pipeline(kind, scheduler, prediction):
    diff = compare_to_pipeline(_pipe(kind, scheduler, prediction), PROMPTS)
    assert diff["image"] <= TOL, diff
    assert diff["latent_rel"] <= TOL, diff


def test_time_map_round_trip():
    """tau <-> timestep: integer timesteps come back; abar(tau) is the scheduler's."""
    sched = sd_scheduler("ddim")
    time = DiscreteTime(sched)
    t = torch.tensor([0, 1, 17, 500, 981, 999])
    tau = tau_from_alpha_bar(sched.alphas_cumprod[t])
    assert torch.allclose(time.timestep(tau), t.double(), atol=1e-6)
    a, b, _ = coefficients(tau)
    assert torch.allclose(a ** 2, sched.alphas_cumprod[t].double(), rtol=1e-6)
    assert torch.allclose(a ** 2 + b ** 2, torch.ones_like(a))
    # Half-way in sigma between two timesteps is half-way in t (Euler's interpolation).
    s = time.sigma_table
    mid = (s[500] + s[501]) / 2
    assert float(time.timestep(mid / (1 + mid))) == pytest.approx(500.5, abs=1e-6)


def test_ddpm_step_matches_scheduler_and_hand_formula():
    """Eq. 4-5 per pixel: uniform field = DDPMScheduler.step; frozen pixels stay; tau_next = 0 lands on x0."""
    sched = sd_scheduler("ddpm")
    sched.set_timesteps(10)
    t, prev = 901, 801
    abar = sched.alphas_cumprod.double()
    tau, tau_p = tau_from_alpha_bar(abar[t]), tau_from_alpha_bar(abar[prev])
    g = torch.Generator().manual_seed(0)
    x_t, eps, z = (torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a, b = abar[t].sqrt(), (1 - abar[t]).sqrt()
    x0 = (x_t - b * eps) / a
    n = coefficients(tau)[2]
    y = x_t * n
    ours = ddpm_step(y, tau, tau_p, x0, z) / coefficients(tau_p)[2]
    alpha = abar[t] / abar[prev]
    beta = 1 - alpha
    mean = abar[prev].sqrt() * beta / (1 - abar[t]) * x0 + alpha.sqrt() * (1 - abar[prev]) / (1 - abar[t]) * x_t
    hand = mean + ((1 - abar[prev]) / (1 - abar[t]) * beta).sqrt() * z
    assert torch.allclose(ours, hand, atol=1e-10)
    # A field: left column frozen (tau_next = tau), right column to 0, middle one step.
    tn = torch.tensor([float(tau), float(tau_p), 0.0], dtype=torch.float64).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    out = ddpm_step(y, torch.full_like(tn, float(tau)), tn, x0, z)
    assert torch.allclose(out[..., 0], y[..., 0], atol=1e-12)
    assert torch.allclose(out[..., 2], x0[..., 2], atol=1e-12)
    assert torch.allclose(out[..., 1] / coefficients(tau_p)[2], hand[..., 1], atol=1e-10)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_per_pixel_path_on_uniform_field_is_stock(kind):
    """The hooked per-pixel forward with a uniform field equals the stock UNet forward."""
    pipe = _pipe(kind, "ddim", "epsilon")
    bb = get_backbone(pipe)
    bb.set_timesteps(4, None)
    cond = bb.encode(PROMPTS, 1.0)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    embeds, added = bb._unet_inputs(cond, x)
    t = torch.full((2, 16, 16), 501.0)
    stock = pipe.unet(x, torch.tensor([501.0, 501.0]), encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    hooked, _ = unet_forward(pipe.unet, x, t, embeds, added, per_pixel=True)
    assert torch.allclose(hooked, stock, atol=1e-5)
    # A region at another time changes the output, and the hooks are gone afterwards.
    t2 = t.clone()
    t2[:, :8] = 101.0
    moved, _ = unet_forward(pipe.unet, x, t2, embeds, added)
    assert (moved - stock).abs().max() > 1e-3
    again = pipe.unet(x, torch.tensor([501.0, 501.0]), encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    assert torch.equal(again, stock)


def test_time_embedding_once_per_distinct_time():
    """The embedding MLP sees one row per distinct (sample, time) pair of all levels, not one per pixel."""
    pipe = _pipe("sd", "ddim", "epsilon")
    bb = get_backbone(pipe)
    cond = bb.encode(PROMPTS[:1], 1.0)
    rows = []
    h = pipe.unet.time_embedding.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    t = torch.full((1, 16, 16), 700.0)
    t[:, :, 8:] = 300.0  # halves: the split falls on pixel boundaries at every level (16, 8, 4)
    try:
        unet_forward(pipe.unet, torch.randn(1, 4, 16, 16), t, cond.embeds)
    finally:
        h.remove()
    # our table (2 image times + 1 text-mean row) and the unused stock call (1 row)
    assert sorted(rows) == [1, 3]


def test_cross_attention_maps_match_processor_scores():
    """Captured maps = softmax(QK^T) of the chosen attn2 layers, head-averaged, upsampled, averaged;
    a custom attention processor keeps working (its output is the model's)."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = _pipe("sd", "ddim", "epsilon")
    bb = get_backbone(pipe)
    cond = bb.encode(PROMPTS, 1.0)
    layers = asyndm_layers(pipe.unet)
    assert layers and all(f == 4 for _, _, f in layers)  # AsynDM: the 1/4-resolution layers
    assert len(layers) < len(cross_attention_layers(pipe.unet))
    recorded = []

    class Recording(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            if encoder_hidden_states is not None:
                q = attn.head_to_batch_dim(attn.to_q(hidden_states))
                k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
                recorded.append(attn.get_attention_scores(q, k, None))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)

    for _, mod, _ in layers:
        mod.set_processor(Recording())
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.full((2, 16, 16), 400.0)
    out, maps = unet_forward(pipe.unet, x, t, cond.embeds, capture=True)
    stock = pipe.unet(x, torch.tensor([400.0, 400.0]), encoder_hidden_states=cond.embeds).sample
    assert torch.allclose(out, stock, atol=1e-6)
    ref = []
    for p in recorded[: len(layers)]:
        heads = p.shape[0] // 2
        p = p.view(2, heads, *p.shape[1:]).mean(1)  # (B, N, T)
        side = int(p.shape[1] ** 0.5)
        m = p.transpose(1, 2).reshape(2, -1, side, side)
        ref.append(torch.nn.functional.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False))
    expected = torch.stack(ref).mean(0)
    assert maps.shape == (2, cond.embeds.shape[1], 16, 16)
    assert torch.allclose(maps, expected, atol=1e-5)
    assert torch.allclose(maps.sum(1), torch.ones(2, 16, 16), atol=1e-5)


# ---- policies on UNets ---------------------------------------------------------------------------
POLICIES = ["synchronous", "dm_concave", "asyndm", "asyndm:fixed", "uncertainty"]


@pytest.mark.parametrize("name", POLICIES)
def test_policies_run_on_unet(name):
    import policies

    pipe = _pipe("sd", "ddim", "epsilon")
    out = tpm.sample(pipe, PROMPTS, policy=policies.load(name), num_inference_steps=5, guidance_scale=2.0,
                     generator=torch.Generator().manual_seed(0), output_type="np", return_trajectory=True)
    assert np.isfinite(out.images).all() and out.images.shape == (2, 32, 32, 3)
    traj = out.trajectory
    assert traj.grid == (16, 16)
    # Every pixel ends on the grid's last time (DDIM's final_alpha_cumprod) or at 0 (policies that
    # send the last step to clean, e.g. uncertainty).
    last = traj.tau[-1]
    assert bool(((last - float(traj.sigmas[-1])).abs() < 1e-6).all() or (last == 0).all())
    if name == "asyndm":
        assert traj.attention[0] is not None and traj.attention[0].shape[-2:] == (16, 16)
        assert not bool(traj.masks[1].all())  # the mask from the maps is not everything


def test_learned_policies_run_on_unet():
    """TPM (pseudo-timestep) and the field policy: their tau conventions go through the same time map."""
    import policies

    pipe = _pipe("sdxl", "euler", "epsilon")
    for policy in (policies.TPM.for_pipeline(pipe), policies.FieldPolicy.for_pipeline(pipe)):
        with policy.exploring():
            out = tpm.sample(pipe, PROMPTS, policy=policy, num_inference_steps=4, guidance_scale=2.0,
                             generator=torch.Generator().manual_seed(0), output_type="np", return_trajectory=True)
        assert np.isfinite(out.images).all()
        assert any(a.log_prob is not None for a in out.trajectory.actions)


def test_inpaint_keeps_known_pixels():
    import policies

    pipe = _pipe("sd", "ddim", "epsilon")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(32, 32)
    mask[:, 16:] = 1  # right half generated
    policy = policies.inpaint_policy(pipe, image, mask)
    out = tpm.sample(pipe, PROMPTS[:1], policy=policy, num_inference_steps=4, guidance_scale=1.0,
                     generator=torch.Generator().manual_seed(0), output_type="latent")
    region = policy.known_region()
    bb = get_backbone(pipe)
    assert bool(region.mask[0, :, :8].all()) and not bool(region.mask[0, :, 8:].any())
    final = bb.to_tokens(out.images)
    keep = region.mask.reshape(1, -1)
    # Known pixels sit at tau = 0, where flow and scheduler latents coincide: kept bit for bit.
    assert torch.equal(final[keep], region.tokens.to(final.dtype)[keep])
    assert not torch.equal(final[~keep], region.tokens.to(final.dtype)[~keep])


# ---- errors ---------------------------------------------------------------------------------------
def test_multistep_scheduler_is_refused():
    pipe = tiny_sd_pipeline(scheduler="pndm")
    with pytest.raises(BackboneError, match="PNDMScheduler cannot be applied per pixel.*DDIMScheduler"):
        tpm.sample(pipe, PROMPTS, num_inference_steps=3)
    pipe.scheduler = sd_scheduler("dpm")
    with pytest.raises(BackboneError, match="DPMSolverMultistepScheduler.*EulerDiscreteScheduler"):
        tpm.sample(pipe, PROMPTS, num_inference_steps=3)


def test_unrepresentable_spacing_is_refused():
    pipe = tiny_sd_pipeline()
    pipe.scheduler = sd_scheduler("ddim", timestep_spacing="linspace")
    with pytest.raises(BackboneError, match="timestep_spacing='leading' or 'trailing'"):
        tpm.sample(pipe, PROMPTS, num_inference_steps=7)


def test_policy_that_does_not_carry_over():
    import policies
    from tpm.policy import PolicyError

    pipe = tiny_sd_pipeline(scheduler="ddpm")
    with pytest.raises(PolicyError, match="velocity_scale.*DDPM"):
        tpm.sample(pipe, PROMPTS, policy=policies.VelocityScale.for_pipeline(pipe), num_inference_steps=3)


def test_mask_of_wrong_size_for_latent_grid():
    import policies

    pipe = tiny_sd_pipeline()  # 32 px images -> 16 x 16 latent grid
    with pytest.raises(ValueError, match=r"token grid \(16, 16\)"):
        tpm.sample(pipe, PROMPTS, policy=policies.Concave(user_mask=torch.ones(8, 8)), num_inference_steps=3)
