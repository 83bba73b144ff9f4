"""Spatial schedules (AsyncPatch §3.2) and input guidance (§3.3, Eq. 6-8) on tiny pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import policies
import tpm
from policies.spatial import Inpaint, Raster, inpaint_policy, outpaint_policy, raster_groups
from tpm.backbones import get_backbone
from tpm.policy import PolicyError

SIZE = 16  # tiny Flux: 2 px per token -> 8 x 8 grid


def _image_and_mask(size=SIZE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.rand(3, size, size, generator=gen)
    mask = torch.zeros(size, size)
    mask[size // 4: 3 * size // 4, size // 2:] = 1  # generate a block on the right
    return img, mask


def _run(pipe, policy, steps=4, size=SIZE, **kw):
    return tpm.sample(pipe, ["a red circle", "a blue square"], policy=policy, num_inference_steps=steps,
                      height=size, width=size, generator=torch.Generator().manual_seed(0),
                      output_type="latent", return_trajectory=True, **kw)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_inpainting_never_changes_a_known_token(flux_pipe, guidance):
    img, mask = _image_and_mask()
    pol = inpaint_policy(flux_pipe, img, mask)
    out = _run(flux_pipe, pol, input_guidance=guidance)
    known = pol.known.reshape(-1)
    assert 0 < int(known.sum()) < known.numel()
    expected = pol.image_latents[:, known].expand(2, -1, -1)
    for lat in out.trajectory.latents:  # before the first step through the final latents
        assert torch.equal(lat[:, known], expected)
    assert torch.equal(out.images[:, known], expected)
    for tau in out.trajectory.tau:
        assert torch.equal(tau[:, pol.known[0]], torch.zeros_like(tau[:, pol.known[0]]))
    # The unknown tokens follow the synchronous grid and were actually generated.
    sig = out.trajectory.sigmas
    for k, tau in enumerate(out.trajectory.tau):
        assert torch.equal(tau[:, ~pol.known[0]], sig[k].expand_as(tau[:, ~pol.known[0]]))
    assert not torch.equal(out.images[:, ~known], out.trajectory.latents[0][:, ~known])


def test_inpainting_on_the_sd3_code_path(sd3_pipe):
    bb = get_backbone(sd3_pipe)
    size = 4 * bb.token_size
    img, mask = _image_and_mask(size)
    pol = inpaint_policy(sd3_pipe, img, mask)
    out = _run(sd3_pipe, pol, steps=3, size=size, input_guidance=1.0)
    known = pol.known.reshape(-1)
    final = bb.to_tokens(out.images)
    assert torch.equal(final[:, known], pol.image_latents[:, known].expand(2, -1, -1))


def test_token_mask_and_leak_free_encoding(flux_pipe):
    img, mask = _image_and_mask()
    pol = inpaint_policy(flux_pipe, img, mask)
    # A token is known iff none of its 2x2 pixels is to be generated.
    expected = torch.nn.functional.max_pool2d(mask[None, None], 2)[0] == 0
    assert torch.equal(pol.known, expected)
    # What the to-generate pixels held cannot change the latents.
    other = img.clone()
    other[:, mask.bool()] = 1.0 - other[:, mask.bool()]
    assert torch.equal(inpaint_policy(flux_pipe, other, mask).image_latents, pol.image_latents)


def test_bad_masks_and_sizes(flux_pipe):
    img, mask = _image_and_mask()
    with pytest.raises(PolicyError, match="same size"):
        inpaint_policy(flux_pipe, img, torch.zeros(SIZE, SIZE + 2))
    soft = mask.clone()
    soft[0, 0] = 0.5
    with pytest.raises(PolicyError, match="binary"):
        inpaint_policy(flux_pipe, img, soft)
    with pytest.raises(PolicyError, match="divisible by 2"):
        inpaint_policy(flux_pipe, torch.rand(3, 15, 15), torch.zeros(15, 15))
    pol = inpaint_policy(flux_pipe, img, mask)
    with pytest.raises(PolicyError, match="build the policy for this image size"):
        _run(flux_pipe, pol, size=2 * SIZE)
    with pytest.raises(PolicyError, match="inpaint_policy"):
        Inpaint()


def test_binary_pil_masks_are_accepted(flux_pipe):
    img, mask = _image_and_mask()
    pil_img = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    pil_mask = Image.fromarray((mask.numpy() * 255).astype(np.uint8))
    pol = inpaint_policy(flux_pipe, pil_img, pil_mask)
    assert torch.equal(pol.known, inpaint_policy(flux_pipe, img, mask).known)


def test_inpaint_policy_round_trips(flux_pipe, tmp_path):
    pol = inpaint_policy(flux_pipe, *_image_and_mask())
    pol.save_pretrained(tmp_path)
    again = policies.load(str(tmp_path))
    assert torch.equal(again.image_latents, pol.image_latents) and torch.equal(again.known, pol.known)


def test_input_guidance_is_eq8_on_guided_predictions(flux_pipe):
    """One step from noise to 0: the result is x - (v_c + lam (v_c - v_n)) on the generated tokens."""
    img, mask = _image_and_mask()
    pol = inpaint_policy(flux_pipe, img, mask)
    lam, t_n = 1.5, 0.7
    out = tpm.sample(flux_pipe, ["a red circle"], policy=pol, num_inference_steps=1, height=SIZE, width=SIZE,
                     generator=torch.Generator().manual_seed(3), output_type="latent", input_guidance=lam,
                     input_guidance_time=t_n, negative_prompt="", true_cfg_scale=2.0)
    bb = get_backbone(flux_pipe)
    cond = bb.encode(["a red circle"], 3.5, negative_prompt=[""], true_cfg_scale=2.0,
                     max_sequence_length=bb.call_default("max_sequence_length"))
    noise = bb.prepare_latents(1, SIZE, SIZE, torch.Generator().manual_seed(3))
    known, kt = pol.known, pol.image_latents
    kt_mask = known.reshape(1, -1, 1)
    x = torch.where(kt_mask, kt, noise)
    tau = torch.where(known, 0.0, 1.0)
    v_c = bb.predict(x, tau, cond).velocity
    v_n = bb.predict(torch.where(kt_mask, (1 - t_n) * kt + t_n * noise, x), torch.where(known, t_n, 1.0),
                     cond).velocity
    expected = x - (v_c + lam * (v_c - v_n))
    unknown = ~known.reshape(-1)
    assert torch.allclose(out.images[:, unknown], expected[:, unknown], atol=1e-5)
    # lambda = 0 is exactly the plain inpainting run.
    kw = dict(policy=pol, num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent")
    a = tpm.sample(flux_pipe, ["a cat"], generator=torch.Generator().manual_seed(1), **kw)
    b = tpm.sample(flux_pipe, ["a cat"], generator=torch.Generator().manual_seed(1), input_guidance=0.0, **kw)
    assert torch.equal(a.images, b.images)


def test_input_guidance_needs_a_known_region(flux_pipe):
    with pytest.raises(PolicyError, match="known region"):
        _run(flux_pipe, None, input_guidance=1.0)


def test_outpainting_keeps_the_pasted_image(flux_pipe):
    img = torch.rand(3, 8, 8)
    pol = outpaint_policy(flux_pipe, img, SIZE, SIZE, top=4, left=8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 4:8] = True
    assert torch.equal(pol.known[0], expected)
    with pytest.raises(PolicyError, match="does not fit"):
        outpaint_policy(flux_pipe, img, SIZE, SIZE, top=10, left=0)


def test_raster_groups_in_order(flux_pipe):
    assert torch.equal(raster_groups((3, 4), 1, 2), torch.tensor([[0, 1], [2, 3], [4, 5]]).repeat_interleave(2, 1))
    out = _run(flux_pipe, Raster(rows_per_group=4), steps=6)  # 8 rows -> 2 groups, 3 steps each
    taus = out.trajectory.tau
    top, bottom = (slice(None), slice(0, 4)), (slice(None), slice(4, 8))
    sig = out.trajectory.sigmas
    for k in range(4):  # stage 0: the top group walks the grid in 3 steps, the bottom waits at noise
        assert torch.equal(taus[k][bottom], torch.full_like(taus[k][bottom], float(sig[0])))
    assert torch.allclose(taus[1][top], torch.full_like(taus[1][top], float(sig[2])))
    for k in range(3, 7):  # stage 1: the top group stays clean
        assert torch.equal(taus[k][top], torch.zeros_like(taus[k][top]))
    assert torch.equal(taus[-1], torch.zeros_like(taus[-1]))
    with pytest.raises(PolicyError, match="at least that many steps"):
        _run(flux_pipe, Raster(rows_per_group=1), steps=4)


def test_cli_inpainting(flux_pipe, tmp_path, monkeypatch, capsys):
    from tpm.app import cli

    img, mask = _image_and_mask()
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "in.png")
    Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((SIZE, SIZE + 2), np.uint8)).save(tmp_path / "wrong.png")
    monkeypatch.setattr(cli, "load_model", lambda model, device=None, lora=None: flux_pipe)
    base = ["sample", "--model", "tiny:flux", "--prompt", "a red circle", "--steps", "2",
            "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "out")]
    assert cli.main([*base, "--mask", str(tmp_path / "mask.png"), "--input-guidance", "1.0"]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert Image.open(written[0]).size == (SIZE, SIZE)
    with pytest.raises(SystemExit, match="same size"):
        cli.main([*base, "--mask", str(tmp_path / "wrong.png")])
    with pytest.raises(SystemExit, match="both --image"):
        cli.main(base)
