"""UNet pipelines (SD 1.x / 2.x, SDXL): per-pixel time, DDIM / Euler / DDPM per pixel, maps, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tpm
from tpm.backbones import BackboneError, get_backbone
from tpm.backbones.discrete import DiscreteTime, coefficients, ddpm_step, tau_from_alpha_bar
from tpm.backbones.unet_forward import asyndm_layers, cross_attention_layers, unet_forward
from tpm.tiny import compare_to_pipeline, sd_scheduler, tiny_sd_pipeline, tiny_sdxl_pipeline

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


def _per_pixel_reference(unet, x, t, embeds, added):
    """Brute force: every pixel of every level gets its own embedding (no table, no gather)."""
    from contextlib import ExitStack

    import torch.nn.functional as F

    from tpm.backbones.unet_forward import level_sizes, resnet_blocks

    b = x.shape[0]
    aug = None
    if unet.config.get("addition_embed_type") == "text_time":
        aug = unet.get_aug_embed(emb=x.new_zeros(1), encoder_hidden_states=embeds, added_cond_kwargs=added)
    emb = {}
    for size in level_sizes(unet, *x.shape[-2:]):
        # mean timestep of the covered latent pixels, rounded to a whole training timestep
        tl = F.adaptive_avg_pool2d(t.to(torch.float64)[:, None], size)[:, 0].round().to(torch.float32)
        e = unet.time_embedding(unet.time_proj(tl.reshape(-1)).to(x.dtype)).view(b, *size, -1)
        if aug is not None:
            e = e + aug[:, None, None]
        emb[size] = unet.time_embed_act(e) if unet.time_embed_act is not None else e
    with ExitStack() as stack:
        for block in resnet_blocks(unet):
            def add(_m, args, block=block):
                e = emb[tuple(args[0].shape[-2:])]
                e = e if block.skip_time_act else block.nonlinearity(e)
                proj = F.linear(e, block.time_emb_proj.weight, block.time_emb_proj.bias)  # the module returns zeros now
                return (args[0] + proj.permute(0, 3, 1, 2),)

            stack.callback(block.time_emb_proj.register_forward_hook(lambda _m, _a, o: torch.zeros_like(o)).remove)
            stack.callback(block.norm2.register_forward_pre_hook(add).remove)
        return unet(x, t.reshape(b, -1).mean(1), encoder_hidden_states=embeds, added_cond_kwargs=added).sample


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_per_pixel_field_equals_per_pixel_embedding(kind):
    """A non-uniform field (four times scattered over the pixels, so that the coarser levels average
    them into many more) gives what embedding every pixel of every level on its own gives: the
    distinct-time table (shared across samples for SD, per sample for SDXL) and both gather layouts
    change nothing but rounding."""
    pipe = _pipe(kind, "ddim", "epsilon")
    bb = get_backbone(pipe)
    cond = bb.encode(PROMPTS, 1.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    embeds, added = bb._unet_inputs(cond, x)
    t = torch.tensor([100.0, 300.0, 700.0, 900.0])[torch.randint(0, 4, (2, 16, 16), generator=g)]
    ours, _ = unet_forward(pipe.unet, x, t, embeds, added)
    ref = _per_pixel_reference(pipe.unet, x, t, embeds, added)
    stock = pipe.unet(x, torch.tensor([500.0, 500.0]), encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    assert (ref - stock).abs().max() > 1e-3  # the field matters
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_time_embedding_once_per_distinct_time():
    """The embedding MLP sees one row per distinct time of all levels, not one per pixel, and (SD:
    no pooled text in the embedding) not one per sample: CFG's two halves share their rows."""
    pipe = _pipe("sd", "ddim", "epsilon")
    bb = get_backbone(pipe)
    cond = bb.encode(PROMPTS, 1.0)
    rows = []
    h = pipe.unet.time_embedding.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    t = torch.full((2, 16, 16), 700.0)
    t[:, :, 8:] = 300.0  # halves: the split falls on pixel boundaries at every level (16, 8, 4)
    try:
        unet_forward(pipe.unet, torch.randn(2, 4, 16, 16), t, cond.embeds)
    finally:
        h.remove()
    # our table (2 times: the UNet has no text tokens, so no text time) and the unused stock call (2 rows)
    assert sorted(rows) == [2, 2]


def test_conditioning_timesteps_on_training_grid_or_levels():
    """Per-pixel conditioning timesteps are whole training timesteps by default (the UNet saw no
    others), exact with ``time_grid=None``, and at most ``time_levels`` per sample when asked."""
    pipe = _pipe("sd", "ddim", "epsilon")
    cond = get_backbone(pipe).encode(PROMPTS, 1.0)
    t = 100.0 + 800.0 * torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(5))
    seen = []
    h = pipe.unet.time_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
    try:
        for kwargs in ({}, {"time_grid": None}, {"time_grid": None, "time_levels": 8}):
            unet_forward(pipe.unet, torch.randn(2, 4, 16, 16), t, cond.embeds, **kwargs)
    finally:
        h.remove()
    table = [x for x in seen if x.numel() > 2]  # the stock call's one row per sample is not ours
    assert torch.equal(table[0], table[0].round()) and table[0].numel() < 2 * (256 + 64 + 16)
    assert not torch.equal(table[1], table[1].round()) and table[1].numel() > table[0].numel()
    assert table[2].numel() <= 2 * 8


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
