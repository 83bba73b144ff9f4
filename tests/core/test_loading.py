"""``tpm.loading``: models and prompt sets by name, with one clear LoadError (never an exit)."""

from __future__ import annotations

import pytest
import torch

from tpm.loading import LoadError, load_model, load_prompts


def test_tiny_models_and_dtypes():
    pipe = load_model("tiny:sd3", dtype="bfloat16")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.transformer.dtype == torch.bfloat16
    assert load_model("tiny:flux", dtype=torch.float32).transformer.dtype == torch.float32


@pytest.mark.parametrize("spec,dtype,match", [
    ("tiny:unet", "float32", "unknown tiny model 'unet'.*flux"),
    ("tiny:flux", "float33", "dtype 'float33' is not a torch dtype"),
    ("testbed:flux-large", "float32", "flux-asyncpatch"),
    ("./no/such/model", "float32", "model path './no/such/model' does not exist"),
    ("", "float32", "model must be"),
])
def test_model_errors_are_load_errors(spec, dtype, match):
    with pytest.raises(LoadError, match=match):
        load_model(spec, dtype=dtype)


def test_a_testbed_folder_loads_with_its_defaults(tmp_path):
    from tpm.testbed.models import TestbedModelConfig, build_pipeline, save_pipeline

    cfg = TestbedModelConfig(vae_channels=(8, 8), latent_channels=4, head_dim=16, num_heads=2, num_layers=1,
                             num_single_layers=1, text_dim=16, t5_dim=32, text_layers=1)
    save_pipeline(build_pipeline(cfg), tmp_path / "tb", cfg, dtype=torch.float32)
    pipe = load_model(str(tmp_path / "tb"))
    assert pipe.tpm_defaults == cfg.defaults
    with pytest.raises(LoadError, match="testbed.json"):
        load_model(f"testbed:{tmp_path}")  # a folder without testbed.json


def test_testbed_prompt_sets_one_spelling_and_the_old_alias():
    val = load_prompts("testbed:val")
    with pytest.warns(DeprecationWarning, match="testbed:val"):
        assert load_prompts("testbed-val") == val
    with pytest.raises(LoadError, match="unknown testbed split 'testbed:dev'.*testbed:train, testbed:val"):
        load_prompts("testbed:dev")
    assert load_prompts("testbed:val", n=5, seed=1) == load_prompts("testbed:val", n=5, seed=1)
