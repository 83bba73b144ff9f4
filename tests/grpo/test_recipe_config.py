"""The run's typed config: presets, YAML and flags over every field, and field-named errors."""

from __future__ import annotations

import dataclasses

import pytest

from tpm.app.recipe import RecipeConfig, available_presets, load_preset, parse_args
from tpm.grpo import GRPOConfig
from tpm.typed_config import ConfigError


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


# The defaults recipes/grpo_flux.py held as Python before they moved into tpm/presets/grpo_flux.yaml
# (copied from the last commit that had them): the README's main job must resolve to exactly these.
OLD_FLUX_DEFAULTS = RecipeConfig(
    model="testbed:flux",
    policy="field",
    policy_options={"patch": 4, "token_offsets": False, "learn_cond": True, "width": 64, "layers": 2, "heads": 4},
    warm_start={"policy": "shifted_grid", "shift": 2.0},
    rewards={"testbed": 1.0},
    train_prompts="testbed:train",
    eval_prompts="testbed:val",
    baselines={
        "shifted grid (shift 2)": {"policy": "shifted_grid", "shift": 2.0},
        "dm_concave (w 0.5)": {"policy": "dm_concave", "weight": 0.5},
    },
    reference_steps=20,
    grpo=GRPOConfig(
        output_dir="outputs/grpo_flux", max_iterations=800, group_size=8, batch_size=64, group_noise="shared",
        rollout_batch_size=64, minibatch_size=32, epochs=1, learning_rate=3e-4, ema_decay=0.99, num_inference_steps=3,
        eval_prompts=352, eval_noise_sets=2, eval_every=200, keep_best=True, save_every=100,
    ),
)
OLD_SD3_DEFAULTS = RecipeConfig(
    model="testbed:sd3",
    policy="tpm",
    policy_options={"width": 64, "heads": 4, "layers": 4, "image_grid": 4},
    rewards={"testbed": 1.0},
    train_prompts="testbed:train",
    eval_prompts="testbed:val",
    grpo=GRPOConfig(
        output_dir="outputs/grpo_sd3", max_iterations=40, group_size=8, batch_size=16, rollout_batch_size=16,
        minibatch_size=4, epochs=1, learning_rate=3e-4, num_inference_steps=10, eval_prompts=32, save_every=10,
    ),
)


def test_presets_equal_the_old_recipe_defaults():
    assert parse_args([], "grpo_flux") == OLD_FLUX_DEFAULTS
    assert parse_args([]) == OLD_FLUX_DEFAULTS  # tpm train's default preset is the README's main job
    assert parse_args([], "grpo_sd3") == OLD_SD3_DEFAULTS
    assert parse_args(["--preset", "grpo_sd3"], "grpo_flux") == OLD_SD3_DEFAULTS
    # testbed_tpm is the main job with the TPM (its base), as recipes/configs/testbed_tpm.yaml was over it
    tpm = parse_args(["--preset", "testbed_tpm"])
    assert tpm.policy == "tpm" and tpm.warm_start is None and tpm.grpo.output_dir == "outputs/grpo_flux_tpm"
    assert tpm.baselines == OLD_FLUX_DEFAULTS.baselines and tpm.grpo.max_iterations == 800


def test_every_preset_resolves():
    assert {"grpo_flux", "grpo_sd3", "flux_dev", "sd35_medium", "testbed_tpm"} <= set(available_presets())
    for name in available_presets():
        cfg = parse_args(["--preset", name])
        assert isinstance(cfg.grpo, GRPOConfig), name
    paper = parse_args(["--preset", "flux_dev"])  # standalone: nothing of the testbed run leaks in
    assert paper.warm_start is None and paper.baselines == {} and paper.grpo.group_noise == "distinct"
    assert paper.grpo.learning_rate == 2e-5 and paper.grpo.sample_kwargs == {"guidance_scale": 5.0}
    assert set(paper.rewards) == {"imagereward", "hpsv2", "clipscore", "pickscore"}
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*grpo_flux"):
        load_preset("nope")


def test_every_field_is_a_flag():
    args = ["--model", "tiny:sd3", "--dtype", "bfloat16", "--lora", "some/lora", "--prompt-cache", "yes",
            "--prompt-cache-file", "pc.safetensors", "--policy", "tpm",
            "--policy-options", '{"width": 32, "heads": 2}', "--warm-start", "none", "--warm-start-prompts", "3",
            "--warm-start-iterations", "0", "--rewards", "testbed=0.25,clipscore=0.75",
            "--reward-options", "{clipscore: {device: cpu}}", "--train-prompts", "p.txt", "--eval-prompts", "q.txt",
            "--train-split", "a", "--eval-split", "b", "--prompt-column", "caption",
            "--baselines", '{"g": {"policy": "shifted_grid", "shift": 1}}', "--reference-steps", "5",
            "--output-dir", "o", "--max-iterations", "3", "--seed", "1", "--accept-config-changes",
            "--report-to", "none", "--group-size", "2", "--batch-size", "4", "--group-noise", "distinct",
            "--rollout-batch-size", "2", "--num-inference-steps", "none", "--height", "64", "--width", "48",
            "--sample-kwargs", "guidance_scale=2.5", "--minibatch-size", "2", "--gradient-accumulation", "2",
            "--epochs", "2", "--learning-rate", "1e-4", "--weight-decay", "0.1", "--warmup-iterations", "1",
            "--lr-schedule", "cosine", "--max-grad-norm", "0", "--clip-eps", "0.1", "--ratio", "step",
            "--kl-coef", "0.5", "--adv-eps", "1e-3", "--advantage-scale", "batch", "--advantage-baseline", "james_stein",
            "--ema-decay", "0.9", "--eval-every", "2",
            "--grpo.eval_prompts", "5", "--eval-noise-sets", "3", "--keep-best", "false", "--save-every", "0",
            "--keep-checkpoints", "4", "--progress", "no"]
    cfg = parse_args(args)
    g = cfg.grpo
    assert (cfg.model, cfg.dtype, cfg.lora, cfg.policy) == ("tiny:sd3", "bfloat16", "some/lora", "tpm")
    assert cfg.prompt_cache is True and cfg.prompt_cache_file == "pc.safetensors"
    assert cfg.policy_options == {"width": 32, "heads": 2} and cfg.warm_start is None
    assert (cfg.warm_start_prompts, cfg.warm_start_iterations, cfg.reference_steps) == (3, 0, 5)
    assert cfg.rewards == {"testbed": 0.25, "clipscore": 0.75} and cfg.reward_options == {"clipscore": {"device": "cpu"}}
    assert (cfg.train_prompts, cfg.eval_prompts, cfg.train_split, cfg.eval_split, cfg.prompt_column) == \
        ("p.txt", "q.txt", "a", "b", "caption")
    assert cfg.baselines == {"g": {"policy": "shifted_grid", "shift": 1}}
    assert (g.output_dir, g.max_iterations, g.seed, g.accept_config_changes, g.trackers()) == ("o", 3, 1, True, [])
    assert (g.group_size, g.batch_size, g.rollout_batch_size, g.minibatch_size) == (2, 4, 2, 2)
    assert g.num_inference_steps is None and (g.height, g.width) == (64, 48)
    assert g.sample_kwargs == {"guidance_scale": 2.5} and g.gradient_accumulation == 2 and g.epochs == 2
    assert g.learning_rate == 1e-4 and isinstance(g.learning_rate, float) and g.weight_decay == 0.1
    assert (g.warmup_iterations, g.lr_schedule, g.max_grad_norm, g.clip_eps, g.ratio) == (1, "cosine", 0.0, 0.1, "step")
    assert (g.kl_coef, g.adv_eps, g.advantage_scale, g.eval_every, g.eval_prompts) == (0.5, 1e-3, "batch", 2, 5)
    assert g.advantage_baseline == "james_stein" and g.ema_decay == 0.9
    assert (g.eval_noise_sets, g.keep_best, g.save_every, g.keep_checkpoints, g.progress) == (3, False, 0, 4, False)
    # every field of both dataclasses was set above (resume / overwrite exclude each other: checked apart)
    named = {a.lstrip("-").replace("-", "_").removeprefix("grpo.") for a in args if a.startswith("--")}
    fields = {f.name for f in dataclasses.fields(RecipeConfig)} | {f.name for f in dataclasses.fields(GRPOConfig)}
    assert fields - named == {"grpo", "resume", "overwrite"}
    assert parse_args(["--resume"]).grpo.resume == "latest"
    assert parse_args(["--resume", "runs/a/checkpoints/checkpoint-000004"]).grpo.resume.endswith("000004")
    assert parse_args(["--overwrite"]).grpo.overwrite is True


def test_yaml_values_are_typed(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; the field's type decides
    cfg = parse_args(["--config", _yaml(tmp_path, "grpo: {learning_rate: 1e-4, batch_size: '64'}\n")])
    assert cfg.grpo.learning_rate == 1e-4 and isinstance(cfg.grpo.learning_rate, float)
    assert cfg.grpo.batch_size == 64 and isinstance(cfg.grpo.batch_size, int)
    cfg = parse_args(["--config", _yaml(tmp_path, "rewards: [testbed, clipscore]\npolicy_options: {width: 8}\n")])
    assert cfg.rewards == {"testbed": 0.5, "clipscore": 0.5} and cfg.policy_options == {"width": 8}
    # a flag beats the file, the file beats the preset
    cfg = parse_args(["--config", _yaml(tmp_path, "grpo: {seed: 3, group_size: 8}\n"), "--seed", "4"])
    assert cfg.grpo.seed == 4 and cfg.grpo.group_size == 8 and cfg.grpo.batch_size == 64
    # base: null starts from the field defaults instead of the preset
    cfg = parse_args(["--config", _yaml(tmp_path, "base: null\ngrpo: {seed: 3}\n")])
    assert cfg.policy == "tpm" and cfg.warm_start is None and cfg.grpo.batch_size == GRPOConfig().batch_size


@pytest.mark.parametrize("text, message", [
    ("grpo: {learning_rate: abc}\n", r"c\.yaml: grpo\.learning_rate must be a number, got 'abc'"),
    ("grpo: {save_every: 2.5}\n", r"grpo\.save_every must be an integer, got 2\.5"),
    ("grpo: {batch_size: sixteen}\n", r"grpo\.batch_size must be an integer, got 'sixteen'"),
    ("grpo: {keep_best: maybe}\n", r"grpo\.keep_best must be true or false"),
    ("grpo: {batch_size: 20}\n", r"batch_size \(20\) must be a multiple of group_size \(8\)"),
    ("grpo: {height: -32}\n", r"height must be a positive number of pixels"),
    ("grpo: {report_to: tensorbord}\n", r"report_to must name trackers"),
    ("grpo: [1, 2]\n", r"grpo must be a mapping of GRPOConfig fields"),
    ("policy_options: 3\n", r"policy_options must be a mapping, got 3"),
    ("rewards: {testbed: high}\n", r"rewards\['testbed'\] must be a number"),
    ("dtype: float8\n", r"dtype must be one of"),
    ("policy: synchronous\n", r"policy must be a trainable policy"),
    ("model: 3\n", r"model must be a string, got 3"),
    ("modle: x\n", r"unknown key modle; valid keys: "),
    ("warm_start: {shift: 2}\npolicy: field\n", r"warm_start must be a mapping with a 'policy' key"),
    ("policy: tpm\n", r"warm_start imitates a fixed policy with a policy that takes a warm start \(field\)"),
    ("grpo: {learning_rate: [1\n", r"c\.yaml' is not valid YAML: .* at line 2, column 1"),
    ("- a\n- b\n", r"must hold a mapping of config keys, got a list"),
])
def test_bad_yaml_is_one_line_naming_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_args(["--config", _yaml(tmp_path, text)])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("flags, message", [
    (["--learning-rate", "abc"], r"command line: grpo\.learning_rate must be a number, got 'abc'"),
    (["--save-every", "2.5"], r"grpo\.save_every must be an integer, got '2\.5'"),
    (["--policy-options", "{width: 3"], r"policy_options: could not parse"),
    (["--policy-options", "width"], r"policy_options: 'width' is not key=value"),
    (["--rewards", "testbed=0.5,clipscore"], r"rewards: 'clipscore' has no weight"),
    (["--rewards", "testbed=x"], r"rewards\['testbed'\] must be a number, got 'x'"),
    (["--resume", "--overwrite"], r"resume and overwrite exclude each other"),
    (["--config", "missing.yaml"], r"config file 'missing.yaml' does not exist"),
    (["--preset", "nope"], r"unknown preset 'nope'"),
])
def test_bad_flags_are_one_line_naming_the_field(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(flags)


def test_cli_errors_are_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    from tpm.app.cli import main

    monkeypatch.chdir(tmp_path)
    bad = _yaml(tmp_path, "grpo:\n  learning_rate: [1e-4\n")
    for argv in (["train", "--config", bad], ["train", "--learning-rate", "abc"], ["train", "--height", "30"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert str(info.value).startswith("error: ") and "\n" not in str(info.value), argv
    # the size is checked against the model's token size (from its config files) before anything loads
    with pytest.raises(SystemExit, match=r"grpo\.height must be a multiple of 8 for testbed:flux.*got 30"):
        main(["train", "--height", "30"])
    assert not (tmp_path / "outputs").exists()  # nothing written
    assert main(["train", "--print-config", "--learning-rate", "1e-4"]) == 0
    assert "learning_rate: 0.0001" in capsys.readouterr().out


def test_a_reward_server_that_is_down_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    import socket

    from tpm.app.cli import main

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    options = f'{{"remote": {{"url": "http://127.0.0.1:{port}", "retries": 1}}}}'
    with pytest.raises(SystemExit) as info:
        main(["train", "--rewards", "remote", "--reward-options", options, "--report-to", "none"])
    message = str(info.value)
    assert message.startswith(f"error: reward server http://127.0.0.1:{port} did not answer GET /health")
    assert f"tpm reward-serve NAME --port {port}" in message and "\n" not in message
    assert not (tmp_path / "outputs").exists()  # refused before the run folder or the model


def test_report_to_goes_through_accelerate(tmp_path):
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    from tpm.grpo.trainer import make_accelerator

    acc = make_accelerator(GRPOConfig(output_dir=str(tmp_path)))
    assert acc.log_with == [LoggerType.TENSORBOARD]  # the default
    assert GRPOConfig(report_to="none").trackers() == [] and GRPOConfig(report_to="wandb, tensorboard").trackers() \
        == ["wandb", "tensorboard"]
    if "wandb" not in {str(t) for t in get_available_trackers()}:  # accelerate alone would drop it silently
        with pytest.raises(ConfigError, match=r"report_to 'wandb': the package for wandb is not installed"):
            make_accelerator(GRPOConfig(output_dir=str(tmp_path), report_to="wandb"))


def test_rewards_are_named_as_everywhere_else():
    # one spec syntax (rewards.load): name[:key=value], on the command line with an optional =WEIGHT
    from tpm.app.recipe import parse_reward_weights

    assert parse_reward_weights("testbed:metric=all_correct") == {"testbed:metric=all_correct": 1.0}
    assert parse_reward_weights("testbed:metric=all_correct=0.25,testbed=0.75") == {
        "testbed:metric=all_correct": 0.25, "testbed": 0.75}
    assert parse_reward_weights("a=0.7,b=0.3") == {"a": 0.7, "b": 0.3}
    cfg = parse_args(["--rewards", "testbed:metric=all_correct=0.5,testbed=0.5"])
    from tpm.app.train import build_reward

    reward = build_reward(cfg, check=False)
    assert reward is not None
