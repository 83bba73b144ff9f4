"""The GRPO trainer on a tiny random Flux with a cheap deterministic reward (mean brightness)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tpm.grpo import GRPOConfig, GRPOConfigError, GRPOTrainer, rollout

from .conftest import PROMPTS, brightness, small_tpm


def make_trainer(pipe, out, reward=brightness, seed=0, **overrides):
    opts = dict(output_dir=str(out), max_iterations=2, group_size=2, batch_size=4, rollout_batch_size=4,
                minibatch_size=2, num_inference_steps=3, height=32, width=32, learning_rate=1e-2, save_every=1,
                eval_prompts=0, progress=False)
    opts.update(overrides)
    return GRPOTrainer(GRPOConfig(**opts), small_tpm(pipe, seed=seed), pipe, reward, PROMPTS)


def params(policy):
    return {k: v.detach().clone() for k, v in policy.named_parameters()}


def test_rollout_keeps_only_replay_inputs(flux_pipe):
    policy = small_tpm(flux_pipe)
    batch = rollout(flux_pipe, policy, PROMPTS[:2], [1, 2], num_inference_steps=3, height=32, width=32)
    assert batch.log_probs.shape == (2, 2)  # K = 3 steps, the first takes no decision (Algorithm 2)
    assert set(batch.static) == {"text", "pooled"} and "image" in batch.steps and "action:r" in batch.steps
    assert batch.images.shape == (2, 3, 32, 32)
    records = batch.records(torch.tensor([1, 0]))
    logp = policy.log_prob(records).view(2, 2)
    assert torch.allclose(logp, batch.log_probs[[1, 0]], atol=1e-5)
    # same seed, same sample, whatever the batch around it
    again = rollout(flux_pipe, policy, PROMPTS[1:2], [2], num_inference_steps=3, height=32, width=32, explore=False)
    ref = rollout(flux_pipe, policy, PROMPTS[:2], [1, 2], num_inference_steps=3, height=32, width=32, explore=False)
    assert torch.allclose(again.images[0], ref.images[1], atol=1e-6)


def test_action_draws_follow_the_sample_not_the_batch(flux_pipe):
    # seeded per sample, a sample explores the same actions whether it is rolled out alone or with others
    # (so N processes, each with its share of the batch, draw what one process draws)
    policy = small_tpm(flux_pipe, gamma=1.0, init_scale=1.0)
    kw = dict(num_inference_steps=3, height=32, width=32, explore=True)
    whole = rollout(flux_pipe, policy, PROMPTS[:3], [1, 2, 3], action_seeds=[7, 8, 9], rollout_batch_size=3, **kw)
    alone = rollout(flux_pipe, policy, PROMPTS[2:3], [3], action_seeds=[9], **kw)
    assert torch.equal(alone.steps["action:r"][0], whole.steps["action:r"][2])
    assert torch.allclose(alone.images[0], whole.images[2], atol=1e-5)
    other = rollout(flux_pipe, policy, PROMPTS[2:3], [3], action_seeds=[10], **kw)
    assert not torch.equal(other.steps["action:r"][0], whole.steps["action:r"][2])
    with pytest.raises(ValueError, match="3 prompts but 2 action seeds"):
        rollout(flux_pipe, policy, PROMPTS[:3], [1, 2, 3], action_seeds=[7, 8], **kw)


def test_a_launch_that_starts_one_process_of_several_is_refused(monkeypatch):
    from tpm.grpo.trainer import check_launch, launched_processes

    for name in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    # what `accelerate launch --cpu --num_processes 2` leaves a script: a master address, no process count
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(GRPOConfigError, match="starts only one .* `torchrun --nproc_per_node N"):
        check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / --multi_gpu
    monkeypatch.setenv("RANK", "0")
    check_launch()
    assert launched_processes() == 2


def test_first_epoch_is_on_policy(flux_pipe, tmp_path):
    tr = make_trainer(flux_pipe, tmp_path, gradient_accumulation=2)  # both minibatches before the first step
    tr._prepare_output()
    rec = tr.train_iteration()
    assert rec["skipped"] == 0.0
    assert rec["train/ratio/min"] == pytest.approx(1.0, abs=1e-5)
    assert rec["train/ratio/max"] == pytest.approx(1.0, abs=1e-5)
    assert rec["train/clip_fraction"] == 0.0


def test_one_step_changes_every_parameter(flux_pipe, tmp_path):
    tr = make_trainer(flux_pipe, tmp_path)
    tr._prepare_output()
    before = params(tr.policy)
    frozen = {k: v.detach().clone() for k, v in flux_pipe.transformer.named_parameters()}
    tr.train_iteration()
    after = params(tr.policy)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert all(torch.equal(v, dict(flux_pipe.transformer.named_parameters())[k]) for k, v in frozen.items())


def test_step_ratio_and_kl_option(flux_pipe, tmp_path):
    tr = make_trainer(flux_pipe, tmp_path, ratio="step", kl_coef=0.1)
    tr._prepare_output()
    rec = tr.train_iteration()
    assert math.isfinite(rec["train/loss"]) and rec["train/kl"] >= 0


def test_nan_reward_skips_the_iteration(flux_pipe, tmp_path, caplog):
    def nan_reward(images, prompts):
        s = brightness(images, prompts)
        s[1] = float("nan")
        return s

    tr = make_trainer(flux_pipe, tmp_path, reward=nan_reward)
    tr._prepare_output()
    before = params(tr.policy)
    with caplog.at_level(logging.WARNING, logger="tpm.grpo"):
        rec = tr.train_iteration()
    assert rec["skipped"] == 1.0 and rec["reward/nonfinite"] == 1.0
    assert "iteration skipped" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in params(tr.policy).items())
    assert tr.iteration == 1


def test_resume_reproduces_the_uninterrupted_run(flux_pipe, tmp_path):
    full = make_trainer(flux_pipe, tmp_path / "a", max_iterations=3).train()
    make_trainer(flux_pipe, tmp_path / "b", max_iterations=2).train()
    resumed_trainer = make_trainer(flux_pipe, tmp_path / "b", max_iterations=3, resume=True, seed=123)
    resumed = resumed_trainer.train()
    assert resumed.history[2] == full.history[2]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a folder holding a run is not silently reused
    with pytest.raises(GRPOConfigError, match="holds another run"):
        make_trainer(flux_pipe, tmp_path / "a").train()
    again = make_trainer(flux_pipe, tmp_path / "a", max_iterations=1, overwrite=True).train()
    assert again.iterations == 1 and len(again.history) == 1
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["checkpoint-000001"]


def test_synchronous_baseline_uses_the_same_noises(flux_pipe, tmp_path):
    # gamma = 0 pins the pseudo-timestep to the grid's own t_k (AsyncDiff Eq. 12 with no deviation), so
    # the policy's evaluation must reproduce the synchronous baseline from the same seeds.
    opts = dict(output_dir=str(tmp_path), max_iterations=1, group_size=2, batch_size=4, rollout_batch_size=2,
                minibatch_size=2, num_inference_steps=3, height=32, width=32, eval_prompts=3, progress=False)
    tr = GRPOTrainer(GRPOConfig(**opts), small_tpm(flux_pipe, gamma=0.0), flux_pipe, brightness, PROMPTS,
                     PROMPTS[:3])
    sync = tr.evaluate(policy=None)
    pinned = tr.evaluate()
    assert not sync.stats and pinned.stats["deviation/mean"] != 0.0  # the mode itself is not 0.5
    assert pinned.metrics["reward"] == pytest.approx(sync.metrics["reward"], abs=1e-7)
    moved = GRPOTrainer(GRPOConfig(**opts), small_tpm(flux_pipe, gamma=1.0, init_scale=1.0), flux_pipe, brightness,
                        PROMPTS, PROMPTS[:3]).evaluate()
    assert abs(moved.means()["reward"] - sync.means()["reward"]) > 1e-5  # a policy that deviates is told apart


@pytest.mark.parametrize("mode", ["shared", "distinct"])
def test_group_noise(flux_pipe, tmp_path, mode):
    # gamma = 0: the TPM's draws do not move the pseudo-timestep, so images differ only by their noise
    tr = GRPOTrainer(GRPOConfig(output_dir=str(tmp_path), max_iterations=1, group_size=2, batch_size=4,
                                rollout_batch_size=4, minibatch_size=2, num_inference_steps=2, height=32, width=32,
                                eval_prompts=0, progress=False, group_noise=mode),
                     small_tpm(flux_pipe, gamma=0.0), flux_pipe, brightness, PROMPTS)
    images = tr.rollout_iteration(0).images
    # Rows of one batched forward: identical inputs at different rows may still differ in the last
    # bits (BLAS kernels can treat tail rows differently), so "same" is 1e-5, "different" is 1e-3.
    gaps = [(images[0] - images[1]).abs().max(), (images[2] - images[3]).abs().max()]
    assert all(g <= 1e-5 for g in gaps) if mode == "shared" else all(g > 1e-3 for g in gaps)
    assert (images[0] - images[2]).abs().max() > 1e-3  # groups never share a noise


def test_keep_best_exports_the_best_evaluation(flux_pipe, tmp_path):
    from safetensors.torch import load_file

    cfg = GRPOConfig(output_dir=str(tmp_path), max_iterations=3, group_size=2, batch_size=4, rollout_batch_size=4,
                     minibatch_size=2, num_inference_steps=2, height=32, width=32, learning_rate=5e-2, eval_prompts=2,
                     eval_every=1, keep_best=True, save_every=1, progress=False)
    tr = GRPOTrainer(cfg, small_tpm(flux_pipe), flux_pipe, brightness, PROMPTS, PROMPTS[:2])
    seen = []
    log_eval = tr._log_eval

    def record(result, step):
        seen.append((float(result.metrics["reward"].mean()), step, {k: v.clone() for k, v in tr.policy.state_dict().items()}))
        return log_eval(result, step)

    tr._log_eval = record
    tr.train()
    score, step, weights = max(seen, key=lambda s: s[0])  # the first of equal scores wins, as in the trainer
    assert tr.best["iteration"] == step and tr.best["score"] == pytest.approx(score)
    exported = load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert all(torch.equal(exported[k], weights[k]) for k in weights)
    assert (tmp_path / "policy_last" / "model.safetensors").is_file()
    with pytest.raises(GRPOConfigError, match="keep_best selects on held-out evaluations"):
        GRPOConfig(keep_best=True, eval_prompts=0)


def test_weight_average_is_evaluated_and_exported(flux_pipe, tmp_path):
    # ema_decay 0.5 by hand: a_0 = w_0, a_t = (a_{t-1} + w_t) / 2 after each iteration's update. Evaluations
    # must see a_t, the export is the final average, the checkpoint keeps the raw weights.
    from safetensors.torch import load_file

    tr = make_trainer(flux_pipe, tmp_path, max_iterations=3, ema_decay=0.5, eval_prompts=2, eval_every=1)
    tr.eval_prompts = PROMPTS[:2]
    raw = [params(tr.policy)]
    update = tr.update

    def record_update(*args):
        out = update(*args)
        raw.append(params(tr.policy))
        return out

    seen = {}
    log_eval = tr._log_eval

    def record_eval(result, step):
        seen[step] = params(tr.policy)
        return log_eval(result, step)

    tr.update, tr._log_eval = record_update, record_eval
    tr.train()
    avg = [raw[0]]
    for w in raw[1:]:
        avg.append({k: (avg[-1][k] + w[k]) / 2 for k in w})
    assert all(not torch.equal(raw[3][k], avg[3][k]) for k in raw[3])  # the average is not the last step
    for step in range(4):
        assert all(torch.allclose(seen[step][k], avg[step][k], atol=1e-7) for k in avg[step]), step
    exported = load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert all(torch.allclose(exported[k], avg[3][k], atol=1e-7) for k in avg[3])
    last = load_file(str(tmp_path / "checkpoints" / "checkpoint-000003" / "policy" / "model.safetensors"))
    assert all(torch.equal(last[k], raw[3][k]) for k in raw[3])
    with pytest.raises(GRPOConfigError, match="ema_decay must be in"):
        GRPOConfig(ema_decay=1.0)


def test_resume_with_a_weight_average(flux_pipe, tmp_path):
    from safetensors.torch import load_file

    make_trainer(flux_pipe, tmp_path / "a", max_iterations=3, ema_decay=0.9).train()
    make_trainer(flux_pipe, tmp_path / "b", max_iterations=2, ema_decay=0.9).train()
    make_trainer(flux_pipe, tmp_path / "b", max_iterations=3, ema_decay=0.9, resume=True).train()
    a = load_file(str(tmp_path / "a" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint written without an average cannot continue one
    make_trainer(flux_pipe, tmp_path / "c", max_iterations=1).train()
    with pytest.raises(GRPOConfigError, match="no weight average"):
        make_trainer(flux_pipe, tmp_path / "c", max_iterations=2, ema_decay=0.9, resume=True,
                     accept_config_changes=True).train()
