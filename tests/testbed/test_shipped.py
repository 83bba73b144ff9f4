"""The shipped testbed checkpoints load offline and sample (tpm/testbed/checkpoints/<name>/)."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

from tpm.testbed.models import CHECKPOINT_DIR, SHIPPED, call_kwargs, load_pipeline

CLASSES = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline, "flux-asyncpatch": FluxPipeline,
           "unet": StableDiffusionPipeline, "spatial": FluxPipeline}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_every_shipped_name_has_a_checkpoint_folder():
    assert set(SHIPPED) == set(CLASSES)
    for name in SHIPPED:
        assert (CHECKPOINT_DIR / name / "model_index.json").is_file(), name
        assert (CHECKPOINT_DIR / name / "testbed.json").is_file(), name


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_shipped_pipeline_loads_offline_and_samples(name):
    pipe = load_pipeline(name)
    assert isinstance(pipe, CLASSES[name])
    size = pipe.tpm_defaults["height"]
    out = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0), output_type="np",
               **call_kwargs(pipe, num_inference_steps=4)).images
    assert out.shape == (2, size, size, 3)
    assert out.std() > 0.01  # a trained model draws something, not a flat image
    # the testbed backbone takes per-token times through the adapter
    from tpm.backbones import get_backbone

    bb = get_backbone(pipe)
    h, w = bb.grid(size, size)
    x = bb.prepare_latents(1, size, size, generator=torch.Generator().manual_seed(0))
    cond = bb.encode(["a red circle"], guidance_scale=1.0)
    tau = torch.linspace(0, 1, h * w).reshape(1, h, w)
    v = bb.predict(x, tau, cond).velocity
    assert v.shape == x.shape and torch.isfinite(v).all()


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_shipped_folder_loads_and_runs_in_plain_diffusers_without_a_dtype(name):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(CHECKPOINT_DIR / name)  # no torch_dtype: the stored one
    assert type(pipe) is CLASSES[name]
    dtypes = {c.dtype for c in pipe.components.values() if isinstance(c, torch.nn.Module)}
    assert dtypes == {torch.float32}
    kwargs = call_kwargs(load_pipeline(name), num_inference_steps=2)
    out = pipe(["a red circle"], generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    assert out.shape[1:] == (kwargs["height"], kwargs["width"], 3) and np.isfinite(out).all()
