"""The field policy's fixed tables: the policy, the coordinate search, and ``tpm search`` on a tiny testbed."""

from __future__ import annotations

import json

import pytest
import torch

import policies
import tpm
from policies.field import FieldPolicy
from policies.field_table import FieldTable
from tpm.policy import PolicyError
from tpm.table_search import coordinate_search
from tpm.tiny import tiny_flux_pipeline

SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def testbed_flux_folder(tmp_path_factory):
    """A saved testbed Flux folder of the smallest size (a model ``tpm search`` loads by path)."""
    from tpm.testbed.models import TestbedModelConfig, build_pipeline, save_pipeline

    cfg = TestbedModelConfig(backbone="flux", vae_channels=(8, 8), latent_channels=4, text_dim=16, t5_dim=32,
                             num_heads=2, head_dim=16, num_layers=1, num_single_layers=1, text_layers=1)
    path = tmp_path_factory.mktemp("tb") / "flux"
    save_pipeline(build_pipeline(cfg), path, cfg, dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def base(pipe):
    return FieldPolicy.for_pipeline(pipe, image_size=(32, 32), patch=2, token_offsets=False, width=16, heads=2,
                                    layers=1, text_tokens=2)


def run(pipe, policy, steps=3):
    return tpm.sample(pipe, ["a red circle", "two blue squares"], policy=policy, num_inference_steps=steps,
                      generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="pt",
                      return_trajectory=True, **SIZE)


def test_a_zero_table_is_the_synchronous_sampler_and_a_grid_move_shortens_the_step(pipe, base):
    sync = run(pipe, None)
    zero = run(pipe, FieldTable.like(base, {"grid": [0, 0, 0], "cond": [0, 0, 0]}))
    assert torch.equal(sync.images, zero.images)
    moved = run(pipe, FieldTable.like(base, {"grid": [0.5, 0, 0], "cond": [0, 0, 0]}))
    s = sync.trajectory.sigmas
    # d = 0.5 >= 0 stops halfway between the grid's next time and the current centre (1): a shorter first step.
    assert torch.allclose(moved.trajectory.tau[1], (s[1] + 0.5 * (1 - s[1])).expand_as(moved.trajectory.tau[1]))
    cond = run(pipe, FieldTable.like(base, {"grid": [0, 0, 0], "cond": [0.6, 0, 0]}))
    assert float((cond.trajectory.tau_cond[0] - cond.trajectory.tau[0]).max()) < 0  # told a cleaner time


def test_a_table_saves_and_loads_as_a_policy(pipe, base, tmp_path):
    table = FieldTable.like(base, {"grid": [0.3, 0.6, 0.0], "cond": [0.6, 0.6, 0.0]})
    table.save_pretrained(tmp_path / "t")
    loaded = policies.load(str(tmp_path / "t"))
    assert isinstance(loaded, FieldTable) and loaded.config.table == table.config.table
    assert torch.equal(run(pipe, loaded).images, run(pipe, table).images)


def test_a_table_refuses_other_step_counts_and_bad_values(pipe, base):
    table = FieldTable.like(base, {"grid": [0.3, 0.6, 0.0]})
    with pytest.raises(PolicyError, match="holds 3 steps, but the run has 4"):
        run(pipe, table, steps=4)
    with pytest.raises(PolicyError, match=r"must lie in \[-1, 1\]"):
        FieldTable.like(base, {"grid": [0.3, 1.5, 0.0]})
    with pytest.raises(PolicyError, match="unknown action parts"):
        FieldTable.like(base, {"speed": [0.3, 0.5, 0.0]})


def test_coordinate_search_finds_the_optimum_of_a_separable_score():
    target = {"grid": [0.3, -0.45], "cond": [0.6, 0.0]}
    calls = []

    def score(table):
        calls.append(table)
        return -sum((a - b) ** 2 for p in target for a, b in zip(table[p], target[p]))

    res = coordinate_search(score, {"grid": [0.0, 0.0], "cond": [0.0, 0.0]},
                            [("grid", 0), ("grid", 1), ("cond", 0), ("cond", 1)],
                            {"grid": [-0.6, -0.3, 0.0, 0.3, 0.6], "cond": [-0.6, 0.0, 0.6]}, refine_passes=2)
    assert res.best["grid"] == pytest.approx([0.3, -0.45]) and res.best["cond"] == pytest.approx([0.6, 0.0])
    assert res.score == pytest.approx(0.0) and res.start_score < res.score
    assert len(calls) == len(res.points) == len({json.dumps(t, sort_keys=True) for t in calls})  # no table twice


SEARCH = """
policy: field
policy_options: {width: 16, heads: 2, layers: 1, text_tokens: 2, patch: 4, token_offsets: false}
rewards: {"sharpmod:sharpness": 1.0}
eval_prompts: testbed:val
grpo: {num_inference_steps: 3, eval_prompts: 3, eval_noise_sets: 1, rollout_batch_size: 8, progress: false}
"""

SHARPNESS = """
def sharpness(images, prompts):
    return 100 * (images[:, :, 1:] - images[:, :, :-1]).abs().mean(dim=(1, 2, 3))
"""


def test_tpm_search_writes_a_table_that_is_a_baseline_and_a_warm_start(tmp_path, monkeypatch, testbed_flux_folder):
    from tpm.app.build import fixed_policy
    from tpm.app.cli import main
    from tpm.app.recipe import RecipeConfig
    from tpm.app.report import compare_specs

    (tmp_path / "sharpmod.py").write_text(SHARPNESS)
    (tmp_path / "s.yaml").write_text(SEARCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "table"
    main(["search", "--config", str(tmp_path / "s.yaml"), "--model", str(testbed_flux_folder), "--out", str(out),
          "--grid-values", "0,0.5", "--cond-values=-0.5,0,0.5", "--grid-passes", "1", "--refine-passes", "0"])
    found = json.loads((out / "search.json").read_text())
    assert found["evaluations"] == 1 + 2 * 1 + 3 * 2  # the start, then each other candidate of each entry once
    assert found["score"] >= found["synchronous"] and found["score"] == round(max(p["score"] for p in found["points"]), 4)
    table = policies.load(str(out))
    assert table.config.table == found["best"]
    # A run names the folder as a baseline (its report row and compare command) and as a warm start.
    cfg = RecipeConfig(policy="field", warm_start={"policy": str(out)}, grpo={"num_inference_steps": 3},
                       baselines={"best searched fixed table": {"policy": str(out)}})
    assert isinstance(fixed_policy(cfg.warm_start), FieldTable)
    assert ("best searched fixed table, 3 steps", str(out)) in compare_specs(cfg)


def test_a_field_policy_imitates_a_table(pipe, base):
    """The warm start from a table: the field policy's deterministic action comes close to the table's values."""
    import copy

    from policies.field_imitation import imitate

    table = FieldTable.like(base, {"grid": [0.5, 0.3, 0.0], "cond": [0.4, -0.3, 0.2]})
    student = copy.deepcopy(base)
    imitate(student, pipe, table, ["a red circle", "two blue squares"], num_inference_steps=3, seeds=[0, 1],
            iterations=150, progress=False, **SIZE)
    def gap(policy) -> float:
        got, want = run(pipe, policy).trajectory, run(pipe, table).trajectory
        return max(float((a - b).abs().max()) for a, b in zip(got.tau + got.tau_cond, want.tau + want.tau_cond))

    before, after = gap(base), gap(student)
    assert after < 0.2 * before
