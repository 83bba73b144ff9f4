"""What ``recipes/grpo_flux.py`` and ``recipes/grpo_sd3.py`` share: parse, build, train, report.

A recipe is a :class:`RecipeConfig` (a YAML file plus command-line overrides, in the spirit of
TRL's ``TrlParser``) turned into a pipeline, a policy, a reward and prompt lists, handed to
:class:`tpm.grpo.GRPOTrainer`. ``policies`` and ``rewards`` are imported inside the functions that
wire them, never at module level, so that ``tpm`` keeps its one-way dependencies.

Defaults are the embedded testbed (SPEC §4): ``model: testbed:flux`` (the shipped tiny Flux),
reward ``testbed`` (the exact verifier), prompts from the testbed's train / val splits.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from tpm.grpo.config import GRPOConfig, GRPOConfigError

TESTBED_PREFIX = "testbed:"


@dataclass
class RecipeConfig:
    """model: "testbed:flux" / "testbed:sd3", a testbed folder, a diffusers folder or a hub id.
    dtype: weights dtype of a diffusers model ("float32", "float16", "bfloat16").
    policy: registered policy name ("tpm", "velocity_scale"); policy_options: its constructor options
    (token/text widths are read from the pipeline). rewards: name -> weight (several are z-scored and
    summed, AsyncDiff Eq. 16); reward_options: name -> options. train_prompts / eval_prompts:
    "testbed:train" / "testbed:val" or a text file with one prompt per line. grpo: GRPOConfig fields."""

    model: str = "testbed:flux"
    dtype: str = "float32"
    policy: str = "tpm"
    policy_options: dict[str, Any] = field(default_factory=dict)
    rewards: dict[str, float] = field(default_factory=lambda: {"testbed": 1.0})
    reward_options: dict[str, dict] = field(default_factory=dict)
    train_prompts: str = "testbed:train"
    eval_prompts: str = "testbed:val"
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


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
    p.add_argument("--output-dir", help="run folder (checkpoints/, logs/, policy/)")
    p.add_argument("--max-iterations", type=int, help="GRPO iterations")
    p.add_argument("--rewards", help="comma-separated reward names, equal weights (e.g. imagereward,hpsv2)")
    p.add_argument("--policy", help="registered policy name (tpm, velocity_scale)")
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
    if args.output_dir:
        grpo["output_dir"] = args.output_dir
    if args.max_iterations is not None:
        grpo["max_iterations"] = args.max_iterations
    if args.resume:
        grpo["resume"] = True
    if args.overwrite:
        grpo["overwrite"] = True
    return _merge(cfg, {**top, "grpo": grpo}, "command line")


# ---- building -----------------------------------------------------------------------------------
def load_model(spec: str, dtype: str = "float32", device=None):
    """A pipeline from a testbed name / folder, a diffusers folder or a hub id (honours HF offline vars)."""
    import torch

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise GRPOConfigError(f"dtype {dtype!r} is not a torch dtype; use float32, float16 or bfloat16")
    from tpm.testbed.models import load_pipeline

    if spec.startswith(TESTBED_PREFIX):
        return load_pipeline(spec[len(TESTBED_PREFIX):], device=device)
    if os.path.isfile(os.path.join(spec, "testbed.json")):
        return load_pipeline(spec, device=device)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(spec, torch_dtype=torch_dtype)
    except Exception as e:  # every loading failure means the same thing to the user
        raise GRPOConfigError(
            f"could not load model {spec!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); pass a local "
            "diffusers folder, or download the hub id where the hub is reachable (cache under $HF_HOME)") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def load_prompts(spec: str, n: int | None = None) -> list[str]:
    """Prompts from ``testbed:<split>`` or a text file (one per line, blank lines ignored)."""
    if spec.startswith(TESTBED_PREFIX):
        from tpm.testbed import get_split

        return [it.prompt for it in get_split(spec[len(TESTBED_PREFIX):], n=n)]
    if not os.path.isfile(spec):
        raise GRPOConfigError(f"prompt file {spec!r} does not exist; give a text file with one prompt per line "
                              "or testbed:train / testbed:val")
    with open(spec) as f:
        prompts = [line.strip() for line in f if line.strip()]
    return prompts[:n] if n is not None else prompts


def sampling_defaults(pipe) -> dict[str, Any]:
    """CFG arguments for ``tpm.sample`` from a testbed pipeline's defaults (Flux: true CFG, empty negative)."""
    if not getattr(pipe, "tpm_defaults", None):
        return {}
    from tpm.testbed.models import call_kwargs

    kw = call_kwargs(pipe)
    return {k: kw[k] for k in ("guidance_scale", "true_cfg_scale", "negative_prompt") if k in kw}


def build_reward(cfg: RecipeConfig):
    """(reward callable returning per-metric raw scores, combine) for the trainer; see trainer docs."""
    import rewards
    from rewards.composite import combine

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

    if len(weights) == 1:
        name = next(iter(weights))
        return metrics, (lambda m: m[name].float() * weights[name])
    return metrics, (lambda m: combine(m, weights).total)


def build_policy(cfg: RecipeConfig, pipe, seed: int):
    import torch

    import policies
    from tpm.policy import registered_policies

    torch.manual_seed(seed)  # identical initial weights on every process
    cls = registered_policies().get(cfg.policy)
    if cls is None or not hasattr(cls, "for_pipeline"):
        raise GRPOConfigError(f"policy {cfg.policy!r} is not a trainable policy; known: {policies.available()}; "
                              "trainable: tpm, velocity_scale")
    return cls.for_pipeline(pipe, **cfg.policy_options)


def run(cfg: RecipeConfig) -> Any:
    """Build everything, train, print where the results went and the reward before / after."""
    from accelerate import Accelerator

    from tpm.grpo.trainer import GRPOTrainer, check_output_dir

    g = cfg.grpo
    check_output_dir(g)  # before loading anything heavy
    acc = Accelerator(log_with="tensorboard", project_dir=os.path.join(g.output_dir, "logs"))
    pipe = load_model(cfg.model, cfg.dtype, device=acc.device)
    if not g.sample_kwargs:
        g = dataclasses.replace(g, sample_kwargs=sampling_defaults(pipe))
    policy = build_policy(cfg, pipe, g.seed)
    reward, combine = build_reward(cfg)
    train = load_prompts(cfg.train_prompts)
    evals = load_prompts(cfg.eval_prompts, n=g.eval_prompts) if g.eval_prompts else []
    trainer = GRPOTrainer(g, policy, pipe, reward, train, evals, accelerator=acc, combine=combine)
    result = trainer.train()
    if acc.is_main_process:
        print(f"policy: {result.policy_dir}  (load with policies.load({result.policy_dir!r}))")
        print(f"logs:   {result.log_dir}  (tensorboard --logdir {result.log_dir})")
        print(f"checkpoints: {os.path.join(g.output_dir, 'checkpoints')}")
        if result.initial_eval or result.final_eval:
            print(f"held-out reward ({len(evals)} prompts, same noises; the policy acts deterministically):")
            keys = sorted(set(result.initial_eval or {}) | set(result.final_eval or {}))
            for k in keys:
                before = (result.initial_eval or {}).get(k, float("nan"))
                after = (result.final_eval or {}).get(k, float("nan"))
                sync = (result.synchronous_eval or {}).get(k, float("nan"))
                print(f"  {k:>12}: synchronous {_fmt(sync)}  policy before {_fmt(before)}  after {_fmt(after)}")
    return result


def _fmt(v: float) -> str:
    """A held-out metric for the summary; '-' where a sampler has none (the synchronous deviation)."""
    return "   -  " if math.isnan(v) else f"{v:.4f}"


def main(argv: list[str] | None, defaults: RecipeConfig, description: str) -> Any:
    """A recipe script's whole body: parse with ``defaults``, train; user errors become one line."""
    from rewards import RewardError
    from tpm.policy import PolicyError

    try:
        return run(parse_args(argv, defaults, description=description))
    except (GRPOConfigError, PolicyError, RewardError, FileNotFoundError) as e:  # user-fixable: one message
        raise SystemExit(f"error: {e}") from None
