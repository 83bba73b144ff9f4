"""Tiny testbed pipelines: tokenizer, builders, save/load, training pieces (all built from config)."""

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from tpm.backbones import get_backbone
from tpm.plots import image_grid
from tpm.testbed import VOCAB
from tpm.testbed.models import (
    TestbedModelConfig as ModelConfig,
)
from tpm.testbed.models import (
    build_pipeline,
    build_tokenizer,
    call_kwargs,
    load_pipeline,
    save_pipeline,
)
from tpm.testbed.train import fit_latent_normalization, flow_matching_loss

TINY = dict(vae_channels=(8, 8), latent_channels=4, head_dim=16, num_heads=2, num_layers=1, num_single_layers=1,
            text_dim=16, t5_dim=32, text_layers=1, num_inference_steps=2)


def tiny(backbone):
    return ModelConfig(backbone=backbone, **TINY)


def test_tokenizer_gives_every_vocab_word_its_own_id_and_appends_eos():
    tok = build_tokenizer(max_length=12)
    ids = [tok.convert_tokens_to_ids(w) for w in VOCAB]
    assert len(set(ids)) == len(VOCAB) and tok.unk_token_id not in ids
    enc = tok("a red circle left of a blue square", padding="max_length", max_length=12, truncation=True)
    words = "a red circle left of a blue square".split()
    assert enc["input_ids"][: len(words) + 1] == [tok.convert_tokens_to_ids(w) for w in words] + [tok.eos_token_id]
    assert enc["input_ids"][len(words) + 1 :] == [tok.pad_token_id] * (12 - len(words) - 1)
    assert tok("a red hexagon")["input_ids"][2] == tok.unk_token_id
    # truncation keeps the eos token, so CLIP's pooled output always exists
    long = tok(" ".join(["red"] * 30), max_length=12, truncation=True)["input_ids"]
    assert len(long) == 12 and long[-1] == tok.eos_token_id


def test_config_rejects_sizes_the_pipelines_cannot_use():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(resolution=30)
    with pytest.raises(ValueError, match="t5_dim"):
        ModelConfig(backbone="sd3", text_dim=32, t5_dim=48)
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig(head_dim=24)
    with pytest.raises(ValueError, match="backbone"):
        ModelConfig(backbone="unet")


@pytest.mark.parametrize("backbone,cls", [("flux", FluxPipeline), ("sd3", StableDiffusion3Pipeline)])
def test_pipeline_samples_at_default_size_and_round_trips(tmp_path, backbone, cls):
    cfg = tiny(backbone)
    pipe = build_pipeline(cfg)
    assert isinstance(pipe, cls)
    assert all(not m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))

    def run(p):
        return p(["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0),
                 output_type="np", **call_kwargs(p)).images

    a = run(pipe)
    assert a.shape == (2, cfg.resolution, cfg.resolution, 3)
    save_pipeline(pipe, tmp_path / "p", cfg, dtype=torch.float32)
    assert json.loads((tmp_path / "p" / "testbed.json").read_text())["backbone"] == backbone
    loaded = load_pipeline(tmp_path / "p")
    assert isinstance(loaded, cls) and loaded.tpm_defaults == cfg.defaults
    assert torch.allclose(torch.from_numpy(run(loaded)), torch.from_numpy(a), atol=1e-5)


def test_load_pipeline_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="flux-asyncpatch"):
        load_pipeline("flux-large")


def test_flux_call_kwargs_use_true_cfg_with_an_empty_negative_prompt():
    pipe = build_pipeline(tiny("flux"))
    assert "negative_prompt" not in call_kwargs(pipe)
    kw = call_kwargs(pipe, true_cfg_scale=3.0)
    assert kw["true_cfg_scale"] == 3.0
    pipe.tpm_defaults["guidance_scale"] = 2.0
    kw = call_kwargs(pipe)
    assert kw["true_cfg_scale"] == 2.0 and kw["negative_prompt"] == ""


def test_latent_normalization_gives_zero_mean_unit_variance_and_round_trips_through_config():
    pipe = build_pipeline(tiny("flux"))
    images = torch.rand(20, 3, 32, 32) * 2 - 1
    lat = fit_latent_normalization(pipe.vae, images, batch_size=8)
    assert abs(lat.mean().item()) < 1e-5 and abs(lat.std().item() - 1) < 1e-4
    raw = pipe.vae.encode(images[:2]).latent_dist.mean
    # the pipelines decode z / scaling_factor + shift_factor: this must give back the raw latents
    back = lat[:2] / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    assert torch.allclose(back, raw, atol=1e-5)


def test_flux_packing_matches_the_pipeline_unpacking():
    pipe = build_pipeline(tiny("flux"))
    bb = get_backbone(pipe)
    lat = torch.randn(2, 4, 16, 16)
    packed = bb.pack_latents(lat)
    assert packed.shape == (2, 64, 16) and bb.token_dim == 16
    assert torch.equal(FluxPipeline._unpack_latents(packed, 32, 32, pipe.vae_scale_factor), lat)
    assert torch.equal(bb.unpack_latents(packed, 32, 32), lat)


@pytest.mark.parametrize("backbone", ["flux", "sd3"])
def test_flow_matching_loss_is_the_velocity_mse_and_reaches_every_trainable_part(backbone):
    torch.manual_seed(0)
    pipe = build_pipeline(tiny(backbone))
    bb = get_backbone(pipe)
    x0 = bb.pack_latents(torch.randn(2, 4, 16, 16))
    noise = torch.randn_like(x0)
    tau = torch.rand(2, 8, 8)
    cond = bb.encode(["a red circle", ""], guidance_scale=1.0, max_sequence_length=16)
    loss = flow_matching_loss(bb, x0, tau, cond, noise)
    # hand computation with the same adapter call
    t = bb.expand_field(tau)
    v = bb.predict((1 - t) * x0 + t * noise, tau, cond).velocity
    assert torch.allclose(loss, ((v - (noise - x0)) ** 2).mean())
    loss.backward()
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        grads = [p.grad for p in pipe.components[name].parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name


def test_image_grid_tiles_with_padding():
    from PIL import Image

    ims = [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(5)]
    g = image_grid(ims, cols=3, pad=1)
    assert g.size == (3 * 5 + 1, 2 * 5 + 1)
    assert g.getpixel((1 + 5 * 1, 1)) == (40, 0, 0)  # second image, first pixel
    with pytest.raises(ValueError):
        image_grid([])


@pytest.mark.slow
def test_train_recipe_runs_under_accelerate_and_exports_a_loadable_pipeline(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
           "--num_cpu_threads_per_process", "1", str(root / "recipes/train_testbed.py"),
           "--backbone", "flux", "--timestep-sampler", "controlled", "--output-dir", str(out),
           "--num-images", "32", "--vae-steps", "2", "--vae-batch-size", "4", "--steps", "2", "--batch-size", "4",
           "--head-dim", "16", "--num-heads", "2", "--num-layers", "1", "--num-single-layers", "1",
           "--grid-prompts", "2", "--num-inference-steps", "2"]
    subprocess.run(cmd, check=True, cwd=root, capture_output=True)
    assert (out / "samples_final.png").is_file() and (out / "vae" / "config.json").is_file()
    report = json.loads((out / "train_report.json").read_text())
    assert report["timestep_sampler"] == "controlled"
    pipe = load_pipeline(out / "pipeline")
    assert pipe.transformer.dtype == torch.float32
    img = pipe("a red circle", generator=torch.Generator().manual_seed(0), **call_kwargs(pipe)).images[0]
    assert img.size == (32, 32)
