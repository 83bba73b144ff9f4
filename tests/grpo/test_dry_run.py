"""``tpm train --dry-run``: the plan from the config and the model's config files, nothing loaded."""

from __future__ import annotations

import json

import pytest

from tpm.app.cli import main

# FLUX.1-dev's transformer config (the published one; only the shapes matter here)
FLUX_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56],
}


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for each of 2 processes
    main(["train", "--dry-run"])
    out = capsys.readouterr().out
    assert "processes:   2 on " in out
    assert "64 samples per iteration = 8 prompts x groups of 8; 32 per process" in out
    assert "32x32, 16 image + 10 text tokens" in out
    assert "transformer 1.8M" in out and "memory per device (estimate)" in out
    assert "testbed (weight 1): in every process, on cpu" in out
    assert not (tmp_path / "outputs").exists()
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match=r"^error: batch_size \(64\) must be divisible by the number of processes "
                       r"\(3\); set batch_size to a multiple of 24 or launch 2 processes$"):
        main(["train", "--dry-run"])


def test_memory_estimate_counts_parameters_from_the_config_alone(tmp_path):
    from tpm.app.plan import estimate
    from tpm.app.recipe import parse_args

    model = tmp_path / "flux-dev"
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                        "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    (model / "transformer" / "config.json").write_text(json.dumps(FLUX_DEV_TRANSFORMER))
    cfg = parse_args(["--model", str(model), "--dtype", "bfloat16", "--height", "512", "--width", "512",
                      "--batch-size", "16", "--rollout-batch-size", "4"])
    plan = estimate(cfg, processes=2)
    n = plan["params"]["transformer"]
    assert 11.8e9 < n < 12.0e9  # FLUX.1-dev's 12B transformer, built on the meta device
    assert plan["memory"]["weights"] == 2 * n and plan["local_batch"] == 8
    # no VAE config here: the default factor 8 -> 16 pixels per token side; 512 T5 tokens for Flux
    assert plan["geometry"]["image_tokens"] == 1024 and plan["geometry"]["text_tokens"] == 512
    assert plan["memory"]["activations"] == 4 * 1536 * 3072 * 28 * 2 + 4 * 3 * 512 * 512 * 4
    assert plan["memory"]["decode"] == 512 * 512 * (2200 + 3 * 1000)  # 4 images decoded at once, 2-byte dtype


def test_sd3_guidance_doubles_the_rollout_batch(tmp_path):
    """SD3's guidance_scale is true CFG (negative branch in the same batch); the pipeline's default is 7."""
    from tpm.app.plan import estimate
    from tpm.app.recipe import parse_args

    model = tmp_path / "sd3"
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                        "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    (model / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "SD3Transformer2DModel", "num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
        "joint_attention_dim": 16, "caption_projection_dim": 16, "pooled_projection_dim": 16, "in_channels": 4,
        "out_channels": 4, "sample_size": 8, "patch_size": 2, "pos_embed_max_size": 16}))
    args = ["--model", str(model), "--height", "64", "--width", "64", "--batch-size", "4", "--group-size", "4",
            "--rollout-batch-size", "2"]
    assert estimate(parse_args(args), processes=1)["rollout_batch"] == 4
    no_cfg = parse_args(args + ["--grpo.sample_kwargs", '{"guidance_scale": 1.0}'])
    assert estimate(no_cfg, processes=1)["rollout_batch"] == 2
