"""Policies exported as diffusers schedulers (``tpm.to_scheduler``) run in unchanged stock pipelines.

Every pipeline here is a tiny stock diffusers pipeline built from config with a non-default
time set-up (Flux with its own dynamic-shift parameters, Flux with a fixed shift, SD3 and SD3.5
with shifts other than SD3's 3.0, SD with DDIM "trailing", Euler and DDPM, SDXL with Euler). For each state-free
policy, ``pipe(...)`` with the exported scheduler must equal ``tpm.sample(pipe, ..., policy=...)``
from the same generator (to 1e-5 of the latents' scale) and differ from the stock scheduler.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import policies
import tpm
from tpm.schedulers import (
    DiscreteTableScheduler,
    FlowMatchTableScheduler,
    ScheduleError,
    ScheduleTable,
    from_pretrained,
    table_policy,
    to_scheduler,
    trace_policy,
)
from tpm.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

from .test_hub import populate_cache

PROMPTS = ["a red circle left of a blue square", "two dogs riding a bike on the beach"]
SIZE = {"height": 32, "width": 32}
TOL = 1e-5
K = 4

# name -> (builder, kwargs); every time set-up differs from the stock default.
PIPES = {
    "flux_dynamic": (tiny_flux_pipeline, {"scheduler_kwargs": {"use_dynamic_shifting": True, "base_shift": 0.3,
                                                                "max_shift": 1.4, "base_image_seq_len": 8,
                                                                "max_image_seq_len": 64}}),
    "flux_shift": (tiny_flux_pipeline, {"scheduler_kwargs": {"shift": 2.2}}),
    "sd3": (tiny_sd3_pipeline, {"scheduler_kwargs": {"shift": 1.7}}),
    "sd35": (tiny_sd3_pipeline, {"dual_attention_layers": (0,), "qk_norm": "rms_norm",
                                 "scheduler_kwargs": {"shift": 4.5}}),
    "sd_ddim": (tiny_sd_pipeline, {"scheduler": "ddim"}),
    "sd_euler": (tiny_sd_pipeline, {"scheduler": "euler"}),
    "sd_ddpm": (tiny_sd_pipeline, {"scheduler": "ddpm"}),
    "sdxl_euler": (tiny_sdxl_pipeline, {"scheduler": "euler"}),
}
_CACHE: dict = {}


def pipeline(name):
    if name not in _CACHE:
        builder, kwargs = PIPES[name]
        pipe = builder(**kwargs)
        if name == "sd_ddim":
            from diffusers import DDIMScheduler

            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        _CACHE[name] = pipe
    return _CACHE[name]


def _call_kwargs(pipe) -> dict:
    # The tiny pipelines' short text length reaches tpm.sample through tpm_defaults, not pipe(...).
    return {} if "StableDiffusion" in type(pipe).__name__ and "3" not in type(pipe).__name__ else {
        "max_sequence_length": 16}


def constant_field(pipe, seed=0):
    """A learned field policy (grid move + conditioning shift, no token offsets) whose heads ignore the
    state: zero weights, random biases. Its told time differs from its update time at every step."""
    pol = policies.FieldPolicy.for_pipeline(pipe, image_size=(32, 32), token_offsets=False, learn_cond=True,
                                            width=16, layers=1, heads=2, cond_range=0.8)
    gen = torch.Generator().manual_seed(seed)
    for head in (pol.net.grid_head, pol.net.token_head):
        torch.nn.init.zeros_(head.weight)
        head.bias.data = torch.randn(head.bias.shape, generator=gen) * 1.5
    return pol


POLICIES = {
    "synchronous": lambda pipe: policies.load("synchronous"),
    "shifted_grid": lambda pipe: policies.load("shifted_grid:shift=2.5"),
    "dm_concave": lambda pipe: policies.load("dm_concave:weight=0.7"),
    "constant_deviation": lambda pipe: policies.load("constant_deviation:r=0.25"),
    "field": constant_field,
}


def _stock(pipe, scheduler=None, seed=3, **kw):
    old = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = scheduler
    try:
        return pipe(PROMPTS, num_inference_steps=kw.pop("steps", K), generator=torch.Generator().manual_seed(seed),
                    output_type=kw.pop("output_type", "latent"), **SIZE, **_call_kwargs(pipe), **kw).images
    finally:
        pipe.scheduler = old


def _ours(pipe, policy, seed=3, output_type="latent"):
    return tpm.sample(pipe, PROMPTS, policy=policy, num_inference_steps=K, generator=torch.Generator().manual_seed(seed),
                      output_type=output_type, **SIZE).images


def _diff(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).abs().max())


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("pipe_name", list(PIPES))
def test_stock_pipeline_with_exported_scheduler_equals_tpm_sample(pipe_name, policy_name):
    pipe = pipeline(pipe_name)
    policy = POLICIES[policy_name](pipe)
    sched = to_scheduler(pipe, policy, K, **SIZE)
    flow = pipe_name.startswith(("flux", "sd3"))
    assert isinstance(sched, FlowMatchTableScheduler if flow else DiscreteTableScheduler)
    ref = _ours(pipe, policy)
    out = _stock(pipe, sched)
    scale = max(1.0, float(ref.abs().max()))
    assert _diff(out, ref) <= TOL * scale
    stock = _stock(pipe)
    if policy_name == "synchronous":
        assert _diff(stock, out) <= TOL * scale
    else:
        assert _diff(stock, out) > 1e-3 * scale
    if policy_name in ("constant_deviation", "field"):  # the told time is not the update time
        cfg = sched.config
        told, grid = (cfg.cond_sigmas, cfg.sigmas) if flow else (cfg.cond_taus, cfg.taus)
        assert max(abs(a - b) for a, b in zip(told[1:], grid[1:-1])) > 1e-3


@pytest.mark.parametrize("pipe_name", ["flux_dynamic", "sd3", "sd_ddim"])
def test_decoded_images_equal(pipe_name):
    pipe = pipeline(pipe_name)
    policy = constant_field(pipe, seed=5)
    sched = to_scheduler(pipe, policy, K, **SIZE)
    assert _diff(_stock(pipe, sched, output_type="np"), _ours(pipe, policy, output_type="np")) <= TOL


def test_flow_table_is_the_policy_on_the_pipeline_grid_by_hand():
    """shifted_grid's table: the pipeline's own (shifted) grid re-shifted once, told time = update time."""
    pipe = pipeline("sd3")
    sched = to_scheduler(pipe, policies.load("shifted_grid:shift=2.5"), K, **SIZE)
    # FlowMatchEulerDiscreteScheduler: u from sigma_max = 1 to its (shifted) sigma_min, then shifted by 1.7
    lowest = 1.7 * 1e-3 / (1 + 0.7 * 1e-3)
    u = np.linspace(1.0, lowest, K)
    own = 1.7 * u / (1 + 0.7 * u)
    want = np.append(2.5 * own / (1 + 1.5 * own), 0.0)
    # our grid starts at the pipeline's own first value; its next values are re-shifted once, not twice
    np.testing.assert_allclose(sched.config.sigmas[1:], want[1:], atol=2e-6)
    np.testing.assert_allclose(sched.config.cond_sigmas, sched.config.sigmas[:-1], atol=0)
    np.testing.assert_allclose(sched.config.timesteps, np.float32(sched.config.sigmas[:-1]) * np.float32(1000),
                               rtol=0, atol=1e-4)


def test_constant_deviation_told_time_by_hand():
    """AsyncDiff Eq. 6 with r fixed: told time t_{k-1} + (0.5 + r)(t_k - t_{k-1}), update on the grid."""
    pipe = pipeline("flux_shift")
    r = 0.25
    sched = to_scheduler(pipe, policies.load(f"constant_deviation:r={r}"), K, **SIZE)
    s = np.asarray(sched.config.sigmas, dtype=np.float64)
    want = [s[0]] + [s[k - 1] + (0.5 + r) * (s[k] - s[k - 1]) for k in range(1, K)]
    np.testing.assert_allclose(sched.config.cond_sigmas, want, atol=1e-6)


def test_save_load_round_trip_and_table_policy(tmp_path):
    pipe = pipeline("flux_dynamic")
    policy = constant_field(pipe)
    sched = to_scheduler(pipe, policy, K, **SIZE)
    sched.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "scheduler_config.json"]  # no pickle, no weights
    with open(tmp_path / "scheduler_config.json") as f:
        assert json.load(f)["_class_name"] == "FlowMatchTableScheduler"
    card = (tmp_path / "README.md").read_text()
    assert "tpm.schedulers.from_pretrained" in card and "| step | from | to | told | timestep |" in card
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is FlowMatchTableScheduler and loaded.config.sigmas == sched.config.sigmas
    assert _diff(_stock(pipe, loaded), _stock(pipe, sched)) == 0
    # The folder as a policy (what tpm compare runs): tpm.sample with it equals the source policy.
    table = table_policy(tmp_path)
    assert isinstance(table, ScheduleTable)
    assert _diff(_ours(pipe, table), _ours(pipe, policy)) <= TOL * 10
    assert isinstance(policies.load(str(tmp_path)), ScheduleTable)


def test_unet_round_trip(tmp_path):
    pipe = pipeline("sd_ddpm")
    sched = to_scheduler(pipe, policies.load("constant_deviation:r=0.25"), K, **SIZE)
    sched.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is DiscreteTableScheduler and loaded.config.update == "ddpm"
    assert _diff(_stock(pipe, loaded), _stock(pipe, sched)) == 0


# ---- what is refused, with one clear error -------------------------------------------------------------
def test_wrong_step_count_is_an_error():
    for name in ("flux_shift", "sd3", "sd_ddim"):
        pipe = pipeline(name)
        sched = to_scheduler(pipe, policies.load("shifted_grid:shift=2.5"), K, **SIZE)
        with pytest.raises(ScheduleError, match=f"num_inference_steps={K}"):
            _stock(pipe, sched, steps=K + 1)


@pytest.mark.parametrize("source,target", [("flux_shift", "sd3"), ("sd3", "flux_shift"), ("sd3", "sd_ddim"),
                                           ("sd_ddim", "flux_shift"), ("sd_ddim", "sd3"), ("flux_shift", "sd_ddim")])
def test_another_family_is_an_error(source, target):
    sched = to_scheduler(pipeline(source), policies.load("shifted_grid:shift=2.5"), K, **SIZE)
    with pytest.raises(ScheduleError, match="exported for"):
        _stock(pipeline(target), sched)


def test_other_size_under_dynamic_shifting_and_custom_sigmas_are_errors():
    pipe = pipeline("flux_dynamic")
    sched = to_scheduler(pipe, policies.load("shifted_grid:shift=2.5"), K, **SIZE)
    with pytest.raises(ScheduleError, match="image size"):
        old = pipe.scheduler
        pipe.scheduler = sched
        try:
            pipe(PROMPTS[:1], num_inference_steps=K, height=48, width=48, output_type="latent", max_sequence_length=16)
        finally:
            pipe.scheduler = old
    with pytest.raises(ScheduleError, match="do not pass sigmas"):
        _stock(pipe, sched, sigmas=[1.0, 0.7, 0.4, 0.1])
    sd = pipeline("sd_ddim")
    with pytest.raises(ScheduleError, match="eta"):
        _stock(sd, to_scheduler(sd, policies.load("shifted_grid:shift=2.5"), K, **SIZE), eta=0.5)


def test_per_token_fields_and_known_regions_are_refused():
    pipe = pipeline("flux_shift")
    with pytest.raises(ScheduleError, match="per-token field"):
        to_scheduler(pipe, policies.load("asyndm"), K, **SIZE)
    known = torch.zeros(1, 2, 2, dtype=torch.bool)
    known[0, 0] = True
    inpaint = policies.Inpaint(image_latents=torch.zeros(1, 4, 4), known=known)
    with pytest.raises(ScheduleError, match="known region"):
        to_scheduler(pipe, inpaint, K, **SIZE)


def test_multistep_unet_scheduler_cannot_be_a_source():
    pipe = tiny_sd_pipeline(scheduler="pndm")
    with pytest.raises(ScheduleError, match="PNDMScheduler cannot be applied.*DDIMScheduler"):
        to_scheduler(pipe, policies.load("shifted_grid:shift=2.5"), K, **SIZE)


def _noisy_tpm(pipe):
    pol = policies.TPM.for_pipeline(pipe, width=16, layers=1, heads=2, image_grid=2, init_scale=3.0)
    return pol.eval()


def test_state_dependent_policy_needs_prompts_and_is_distilled_to_its_mean_table():
    pipe = pipeline("sd3")
    policy = _noisy_tpm(pipe)
    with pytest.raises(ScheduleError, match="state-dependent"):
        to_scheduler(pipe, policy, K, **SIZE)
    train = ["a cat", "a red square", "three blue circles", "a dog on a bike"]
    test = ["a green triangle", "two cats"]
    lines: list[str] = []

    def brightness(images, prompts):  # a reward: mean pixel value per image
        return [float(np.asarray(im, dtype=np.float64).mean()) for im in images]

    sched = to_scheduler(pipe, policy, K, prompts=train, seeds=(0, 1), test_prompts=test, reward=brightness,
                         report=lines.append, **SIZE)
    tr = trace_policy(pipe, policy, K, train, seeds=(0, 1), **SIZE)
    assert tr.taus.shape == (8, K + 1) and tr.token_spread == 0
    assert float(tr.cond.std(0).max()) > 1e-4  # it really depends on the state
    np.testing.assert_allclose(sched.config.cond_sigmas, tr.cond.mean(0).float().numpy(), atol=1e-7)
    np.testing.assert_allclose(sched.config.sigmas, tr.taus.mean(0).float().numpy(), atol=1e-7)
    # The stock pipeline with the table equals tpm.sample with the table.
    assert _diff(_stock(pipe, sched), _ours(pipe, table_policy(sched))) <= TOL * 10
    held = sched.config.export_info["heldout"]
    assert held["prompts"] == 2 and held["cond_gap"]["max"] > 0
    assert held["table_minus_policy"]["low"] <= held["table_minus_policy"]["estimate"] <= held["table_minus_policy"]["high"]
    assert len(lines) == 1 and "table - policy" in lines[0]


def test_distillation_benchmark_checks_the_stock_pipeline_against_the_table(load_benchmark, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    bench = load_benchmark("scheduler_distillation")
    pipe = pipeline("flux_dynamic")
    sched = to_scheduler(pipe, _noisy_tpm(pipe), K, prompts=PROMPTS, **SIZE)
    assert bench.stock_vs_table(pipe, sched, table_policy(sched), PROMPTS, K, dict(SIZE)) <= TOL * 10
    sched_other = to_scheduler(pipe, policies.load("shifted_grid:shift=3"), K, **SIZE)
    assert bench.stock_vs_table(pipe, sched_other, table_policy(sched), PROMPTS, K, dict(SIZE)) > 1e-3


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache with the Hub switched off (as in test_hub.py)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_repo_of_an_exported_schedule(tmp_path, offline_cache):
    pipe = pipeline("flux_shift")
    folder = tmp_path / "export"
    to_scheduler(pipe, policies.load("constant_deviation:r=0.3"), K, **SIZE).save_pretrained(folder)
    populate_cache(offline_cache, "org/sched", folder, "c" * 40)
    sched = from_pretrained("org/sched")
    assert isinstance(sched, FlowMatchTableScheduler) and len(sched.config.timesteps) == K
    assert isinstance(policies.load("org/sched"), ScheduleTable)  # tpm compare / sample take it too
    with pytest.raises(ScheduleError, match="not in the local HF cache"):
        from_pretrained("org/missing")
