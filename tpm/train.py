"""The training entry point: ``recipes/grpo_flux.py``, ``recipes/grpo_sd3.py`` and ``tpm train`` call :func:`main`.

A run is a :class:`RecipeConfig` (a YAML file plus command-line overrides, in the spirit of TRL's
``TrlParser``) turned into a pipeline, a policy, a reward and prompt lists, optionally a warm start
(the field policy imitating a fixed policy), then :class:`tpm.grpo.GRPOTrainer`, then a held-out
report. This module and ``tpm.cli`` are the two places in ``tpm`` that turn names into ``policies``
and ``rewards`` objects; the rest of ``tpm`` never imports those packages.

The report compares, on the held-out prompts with the same noise per prompt (paired), the
synchronous sampler at the run's step count and at ``reference_steps``, every fixed ``baselines``
policy at the run's step count, the policy before training (after any warm start) and after. Each
difference against the synchronous sampler at the same steps is a paired bootstrap interval over
prompts. It is printed, written to ``report.json`` / ``report.md`` and drawn as ``report.png``.

Defaults are the embedded testbed: ``model: testbed:flux``, reward ``testbed`` (the exact verifier),
prompts from the testbed's train / val splits.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tpm.grpo.config import GRPOConfig, GRPOConfigError


@dataclass
class RecipeConfig:
    """model: "testbed:flux" / "testbed:sd3", a testbed or diffusers folder, a hub id, "tiny:flux".
    dtype: weights dtype of a diffusers model ("float32", "float16", "bfloat16").
    policy: trainable policy name ("field", "tpm", "velocity_scale"); policy_options: its constructor
    options (token/text widths and the token grid are read from the pipeline).
    warm_start: a fixed policy the field policy imitates before GRPO, as {"policy": name, **options};
    warm_start_prompts / warm_start_iterations: how many training prompts it is run on, fitting steps.
    rewards: name -> weight (several are z-scored and summed, AsyncDiff Eq. 16); reward_options:
    name -> options. train_prompts / eval_prompts: "testbed:train" / "testbed:val", a text file (one
    prompt per line) or any prompt set ``tpm.loading`` knows. baselines: label -> {"policy": name,
    **options}, fixed policies reported at the run's step count. reference_steps: the synchronous
    step count reported as the quality a few-step policy aims at. grpo: GRPOConfig fields."""

    model: str = "testbed:flux"
    dtype: str = "float32"
    policy: str = "tpm"
    policy_options: dict[str, Any] = field(default_factory=dict)
    warm_start: dict[str, Any] | None = None
    warm_start_prompts: int = 512
    warm_start_iterations: int = 300
    rewards: dict[str, float] = field(default_factory=lambda: {"testbed": 1.0})
    reward_options: dict[str, dict] = field(default_factory=dict)
    train_prompts: str = "testbed:train"
    eval_prompts: str = "testbed:val"
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference_steps: int = 20
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


TRAINABLE = ("field", "tpm", "velocity_scale")


def _merge(cfg: RecipeConfig, data: dict[str, Any], source: str) -> RecipeConfig:
    names = {f.name for f in dataclasses.fields(RecipeConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise GRPOConfigError(f"{source}: unknown keys {unknown}; valid keys are {sorted(names)}")
    data = dict(data)
    grpo = data.pop("grpo", None) or {}
    if not isinstance(grpo, dict):
        raise GRPOConfigError(f"{source}: 'grpo' must be a mapping of GRPOConfig fields")
    gnames = {f.name for f in dataclasses.fields(GRPOConfig)}
    bad = sorted(set(grpo) - gnames)
    if bad:
        raise GRPOConfigError(f"{source}: unknown grpo keys {bad}; valid keys are {sorted(gnames)}")
    return dataclasses.replace(cfg, **data, grpo=dataclasses.replace(cfg.grpo, **grpo))


def parse_args(argv: list[str] | None = None, defaults: RecipeConfig | None = None,
               description: str = "") -> RecipeConfig:
    """``--config FILE.yaml`` then the explicit flags, over ``defaults``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML file with RecipeConfig keys (and a 'grpo:' section)")
    p.add_argument("--model", help="testbed:flux | testbed:sd3 | a testbed or diffusers folder | a hub id")
    p.add_argument("--output-dir", help="run folder (checkpoints/, logs/, policy/, report.*)")
    p.add_argument("--max-iterations", type=int, help="GRPO iterations")
    p.add_argument("--seed", type=int, help="seeds the policy's initial weights, prompts, noises and draws")
    p.add_argument("--rewards", help="comma-separated reward names, equal weights (e.g. imagereward,hpsv2)")
    p.add_argument("--policy", help=f"trainable policy name ({', '.join(TRAINABLE)})")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    args = p.parse_args(argv)
    cfg = defaults or RecipeConfig()
    if args.config:
        import yaml

        if not os.path.isfile(args.config):
            raise GRPOConfigError(f"--config {args.config}: no such file")
        with open(args.config) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise GRPOConfigError(f"{args.config} must hold a mapping of RecipeConfig keys")
        cfg = _merge(cfg, data, args.config)
    top: dict[str, Any] = {}
    if args.model:
        top["model"] = args.model
    if args.policy:
        top["policy"] = args.policy
    if args.rewards:
        names = [n.strip() for n in args.rewards.split(",") if n.strip()]
        top["rewards"] = {n: 1.0 / len(names) for n in names}
    grpo: dict[str, Any] = {}
    for name in ("output_dir", "max_iterations", "seed"):
        value = getattr(args, name)
        if value is not None:
            grpo[name] = value
    if args.resume:
        grpo["resume"] = True
    if args.overwrite:
        grpo["overwrite"] = True
    return _merge(cfg, {**top, "grpo": grpo}, "command line")


# ---- building -------------------------------------------------------------------------------------
def build_reward(cfg: RecipeConfig):
    """A :class:`tpm.grpo.TrainingReward`: raw per-metric scores per process, combined on the gathered batch."""
    import rewards
    from rewards.composite import combine
    from tpm.grpo.reward import TrainingReward

    if not cfg.rewards:
        raise GRPOConfigError("rewards is empty; name at least one reward (e.g. testbed)")
    unknown = sorted(set(cfg.reward_options) - set(cfg.rewards))
    if unknown:
        raise GRPOConfigError(f"reward_options given for {unknown}, which have no weight in rewards")
    models = {name: rewards.load(name, **cfg.reward_options.get(name, {})) for name in cfg.rewards}
    weights = dict(cfg.rewards)

    def metrics(images, prompts):
        # raw_scores returns NaN instead of raising, so the trainer can skip that iteration.
        return {name: m.raw_scores(images, prompts) for name, m in models.items()}

    def summary(means: dict[str, float]) -> float:  # keep_best's criterion: the weighted raw means
        return sum(weights[name] * means[name] for name in weights)

    if len(weights) == 1:
        name = next(iter(weights))
        return TrainingReward(metrics, lambda m: m[name].float() * weights[name], summary)
    return TrainingReward(metrics, lambda m: combine(m, weights).total, summary)


def build_policy(cfg: RecipeConfig, pipe, seed: int):
    import torch

    import policies
    from tpm.policy import registered_policies

    if cfg.policy not in TRAINABLE:
        raise GRPOConfigError(f"policy {cfg.policy!r} is not a trainable policy; trainable: {list(TRAINABLE)} "
                              f"(all policies: {policies.available()})")
    torch.manual_seed(seed)  # identical initial weights on every process
    g = cfg.grpo
    cls = registered_policies()[cfg.policy]
    if cfg.policy == "field":
        return cls.for_pipeline(pipe, image_size=(g.height, g.width), **cfg.policy_options)
    return cls.for_pipeline(pipe, **cfg.policy_options)


def fixed_policy(spec: dict[str, Any], what: str):
    """A fixed policy from {"policy": name, **options}."""
    import policies

    if not isinstance(spec, dict) or "policy" not in spec:
        raise GRPOConfigError(f"{what} must be a mapping with a 'policy' key naming a fixed policy, got {spec!r}")
    opts = dict(spec)
    return policies.load(opts.pop("policy"), **opts)


def warm_start(cfg: RecipeConfig, policy, pipe, quiet: bool) -> dict[str, float] | None:
    """Imitate ``cfg.warm_start`` with the field policy before GRPO (a no-op when it is None)."""
    if cfg.warm_start is None:
        return None
    if cfg.policy != "field":
        raise GRPOConfigError(f"warm_start imitates a fixed policy with the field policy; policy is {cfg.policy!r}")
    from policies.field_imitation import imitate
    from tpm.loading import load_prompts

    g = cfg.grpo
    source = fixed_policy(cfg.warm_start, "warm_start")
    prompts = load_prompts(cfg.train_prompts, n=cfg.warm_start_prompts, seed=g.seed)
    return imitate(policy, pipe, source, prompts, num_inference_steps=g.num_inference_steps,
                   seeds=[g.seed * 100_003 + i for i in range(len(prompts))], iterations=cfg.warm_start_iterations,
                   sample_kwargs=g.sample_kwargs, height=g.height, width=g.width, progress=not quiet)


# ---- the run --------------------------------------------------------------------------------------
def run(cfg: RecipeConfig) -> Any:
    """Build everything, train, report on the held-out prompts."""
    from accelerate import Accelerator

    from tpm.backbones import get_backbone
    from tpm.grpo.checkpoint import check_output_dir
    from tpm.grpo.trainer import GRPOTrainer
    from tpm.loading import load_model, load_prompts

    g = cfg.grpo
    check_output_dir(g)  # before loading anything heavy
    if cfg.reference_steps < 1:
        raise GRPOConfigError(f"reference_steps must be >= 1, got {cfg.reference_steps}")
    baselines = {label: fixed_policy(spec, f"baselines[{label!r}]") for label, spec in cfg.baselines.items()}
    acc = Accelerator(log_with="tensorboard", project_dir=os.path.join(g.output_dir, "logs"))
    pipe = load_model(cfg.model, cfg.dtype, device=acc.device)
    if not g.sample_kwargs:
        g = dataclasses.replace(g, sample_kwargs=get_backbone(pipe).sample_kwargs())
    cfg = dataclasses.replace(cfg, grpo=g)
    policy = build_policy(cfg, pipe, g.seed)
    reward = build_reward(cfg)
    train = load_prompts(cfg.train_prompts)
    evals = load_prompts(cfg.eval_prompts) if g.eval_prompts else []
    evals = evals[: g.eval_prompts]
    if not g.resume:
        fit = warm_start(cfg, policy, pipe, quiet=not (g.progress and acc.is_main_process))
        if fit is not None and acc.is_main_process:
            print(f"warm start: imitated {cfg.warm_start} (squared error of the action parts: "
                  + ", ".join(f"{k} {v:.2g}" for k, v in fit.items()) + ")")
    before = copy.deepcopy(policy)
    trainer = GRPOTrainer(g, policy, pipe, reward, train, evals, accelerator=acc)
    result = trainer.train()
    if evals:
        report = held_out_report(trainer, before, baselines, cfg)
        if acc.is_main_process:
            write_report(report, trainer, g.output_dir)
    if acc.is_main_process:
        from tpm.model_card import write_run_cards  # README.md cards: backbone, reward, GRPO config, report

        write_run_cards(trainer.policy.card_info(), g.output_dir, dataclasses.asdict(cfg), report if evals else None)
        print(f"policy: {result.policy_dir}  (load with policies.load({result.policy_dir!r}))")
        print(f"logs:   {result.log_dir}  (tensorboard --logdir {result.log_dir})")
        print(f"checkpoints: {os.path.join(g.output_dir, 'checkpoints')}")
    return result


def held_out_report(trainer, before, baselines: dict, cfg: RecipeConfig) -> dict[str, Any]:
    """Per-method held-out scores on the same prompts and noises, with paired differences."""
    from tpm.comparison.stats import paired_bootstrap

    k = cfg.grpo.num_inference_steps
    rows: list[tuple[str, Any, int | None]] = [(f"synchronous, {k} steps", None, k),
                                                (f"synchronous, {cfg.reference_steps} steps", None, cfg.reference_steps)]
    rows += [(f"{label}, {k} steps", pol, k) for label, pol in baselines.items()]
    rows += [("policy before training", before, k), ("policy after training", trainer.policy, k)]
    results = {label: trainer.evaluate(policy=pol, num_inference_steps=steps, keep_images=8)
               for label, pol, steps in rows}
    base = results[rows[0][0]]
    out: dict[str, Any] = {"prompts": cfg.eval_prompts, "n": int(len(base.total)), "steps": k,
                           "noise_sets": cfg.grpo.eval_noise_sets, "selected": trainer.best, "rows": {}}
    for label, res in results.items():
        row = {name: round(float(np.mean(v)), 4) for name, v in res.metrics.items()}
        diffs = {}
        if label != rows[0][0]:
            for name, v in res.metrics.items():
                d = paired_bootstrap(v, base.metrics[name], num_resamples=4000)
                diffs[name] = [round(d.estimate, 4), round(d.low, 4), round(d.high, 4)]
        out["rows"][label] = {"mean": row, "minus_synchronous": diffs, "stats": res.stats}
    out["_images"] = {label: res.images for label, res in results.items()}
    return out


def write_report(report: dict[str, Any], trainer, output_dir: str) -> None:
    from tpm.plots import image_grid

    images = report.pop("_images")
    lines = [f"Held-out reward ({report['prompts']}, {report['n']} prompts x {report['noise_sets']} noises, the same "
             f"for every row; the policies act deterministically). Difference: paired bootstrap over prompts, 95 %.", ""]
    metric_names = list(next(iter(report["rows"].values()))["mean"])
    lines.append("| " + " | ".join(["method", *metric_names, *[f"{m} minus synchronous@{report['steps']}"
                                                                for m in metric_names]]) + " |")
    lines.append("|" + "---|" * (1 + 2 * len(metric_names)))
    for label, row in report["rows"].items():
        means = [f"{row['mean'][m]:.4f}" for m in metric_names]
        diffs = [("{:+.4f} [{:+.4f}, {:+.4f}]".format(*row["minus_synchronous"][m]) if m in row["minus_synchronous"]
                  else "-") for m in metric_names]
        lines.append("| " + " | ".join([label, *means, *diffs]) + " |")
    sel = report.get("selected") or {}
    if sel.get("iteration") is not None:
        lines += ["", f"The exported policy is the evaluation of iteration {sel['iteration']} with the best reward on "
                  "these prompts (keep_best), so its row is optimistic here: report held-out claims on other prompts "
                  "and noises (benchmarks/heldout_gain.py --prompts testbed:test)."]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    tiles = [img for label in images if images[label] is not None for img in _to_pil(images[label])]
    cols = max(1, min(len(v) for v in images.values() if v is not None))
    if tiles:
        grid = image_grid(tiles, cols=cols, labels_left=list(images), cell=96)
        grid.save(os.path.join(output_dir, "report.png"))


def _to_pil(batch) -> list:
    from PIL import Image

    arr = (batch.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def main(argv: list[str] | None = None, defaults: RecipeConfig | None = None, description: str = "") -> Any:
    """A recipe's whole body: parse with ``defaults``, train; user errors become one line and exit status 1."""
    from rewards import RewardError
    from tpm.loading import LoadError
    from tpm.policy import PolicyError

    try:
        return run(parse_args(argv, defaults, description=description))
    except (GRPOConfigError, PolicyError, RewardError, LoadError, FileNotFoundError) as e:  # user-fixable
        raise SystemExit(f"error: {e}") from None
