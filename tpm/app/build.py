"""A training run's parts, built from its config: ``run = build(cfg, ...)``, then
``GRPOTrainer(...).train()``, then :mod:`tpm.app.report`.

:func:`prepare` does what needs no model, so that a user's mistake is reported in seconds: the
image size against the model's token size (when its config is readable), the fixed policies and
rewards named (a reward server that is down is reported now), the process count, the run folder
(locked for the main process, :func:`tpm.grpo.checkpoint.preflight`). :func:`build` then loads the
prompts and the model and builds the policy (with any warm start) into one :class:`Run`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from tpm.app.recipe import RecipeConfig
from tpm.grpo.config import GRPOConfigError
from tpm.typed_config import ConfigError


@dataclass
class Run:
    """What :class:`tpm.grpo.GRPOTrainer` and the held-out report are given."""

    cfg: RecipeConfig  # grpo.sample_kwargs filled from the pipeline
    accelerator: Any
    pipe: Any
    policy: Any  # the trainable policy, after any warm start
    start: Any  # a copy of it: the report's "policy before training"
    reward: Any  # a tpm.grpo.TrainingReward
    baselines: dict[str, Any]  # label -> fixed policy, reported beside it
    train_prompts: list[str]
    eval_prompts: list[str]


@dataclass
class Checked:
    """What :func:`prepare` built before the model loads."""

    baselines: dict[str, Any]
    reward: Any
    accelerator: Any


# ---- parts -----------------------------------------------------------------------------------------
def build_reward(cfg: RecipeConfig, check: bool = True):
    """A :class:`tpm.grpo.TrainingReward`: raw per-metric scores per process, combined on the gathered batch.
    ``check``: ask every reward whether it can score (``RewardModel.check``: a reward server that is down is
    reported now, before the model loads, not after the warm start)."""
    import rewards
    from rewards.composite import combine
    from tpm.grpo.reward import TrainingReward

    models = {name: rewards.load(name, **cfg.reward_options.get(name, {})) for name in cfg.rewards}
    weights = dict(cfg.rewards)
    for model in models.values() if check else ():
        model.check()

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
    """The trainable policy ``cfg.policy`` (checked by :class:`RecipeConfig`), sized for ``pipe``."""
    import torch

    from tpm.policy import trainable_policies

    torch.manual_seed(seed)  # identical initial weights on every process
    g = cfg.grpo
    cls = trainable_policies()[cfg.policy]
    size = {"image_size": (g.height, g.width)} if cls.sized_to_image else {}
    return cls.for_pipeline(pipe, **size, **cfg.policy_options)


def fixed_policy(spec: dict[str, Any]):
    """A fixed policy from {"policy": name, **options} (its shape checked by :class:`RecipeConfig`)."""
    import policies

    opts = dict(spec)
    return policies.load(opts.pop("policy"), **opts)


def warm_start(cfg: RecipeConfig, policy, pipe, quiet: bool) -> dict[str, float] | None:
    """Imitate ``cfg.warm_start`` before GRPO (a no-op when it is None; :class:`RecipeConfig` checks that the
    policy takes a warm start)."""
    if cfg.warm_start is None:
        return None
    from policies.field_imitation import imitate
    from tpm.loading import load_prompts

    g = cfg.grpo
    source = fixed_policy(cfg.warm_start)
    prompts = load_prompts(cfg.train_prompts, n=cfg.warm_start_prompts, seed=g.seed, column=cfg.prompt_column,
                           split=cfg.train_split)
    return imitate(policy, pipe, source, prompts, num_inference_steps=g.num_inference_steps,
                   seeds=[g.seed * 100_003 + i for i in range(len(prompts))], iterations=cfg.warm_start_iterations,
                   sample_kwargs=g.sample_kwargs, height=g.height, width=g.width, progress=not quiet)


def check_size(cfg: RecipeConfig) -> None:
    """Image height / width against the model's token size, read from its config files (no weights)."""
    from tpm.loading import model_token_size

    g = cfg.grpo
    if g.height is None and g.width is None:
        return
    ts = model_token_size(cfg.model)
    if ts is None:  # not readable before loading: the backbone checks it right after
        return
    for name in ("height", "width"):
        v = getattr(g, name)
        if v is not None and v % ts:
            raise GRPOConfigError(f"grpo.{name} must be a multiple of {ts} for {cfg.model} (VAE factor x patch "
                                  f"size), got {v}; e.g. {max(ts, round(v / ts) * ts)}")


def check_resume(cfg: RecipeConfig) -> None:
    """Refuse a resume whose config differs from its checkpoint's, before anything loads."""
    from tpm.grpo import checkpoint as ckpt

    ckpt.resume_changes(cfg.grpo, run_config(cfg))


def prompt_cache(cfg: RecipeConfig, pipe, prompts: list[str], acc) -> None:
    """Encode every prompt of the run once (reading and writing ``prompt_cache_file``), attach the cache to
    ``pipe`` and move its text encoders off the device (:mod:`tpm.prompt_cache`)."""
    from tpm.prompt_cache import PromptCache

    g = cfg.grpo
    path = cfg.prompt_cache_file or os.path.join(g.output_dir, "prompt_cache.safetensors")
    cache = PromptCache(pipe)
    loaded = cache.load(path) if os.path.isfile(path) else 0
    total = cache.fill(prompts, batch_size=g.rollout_batch_size, **g.sample_kwargs)
    cache.attach()
    moved = cache.free_encoders()
    acc.wait_for_everyone()  # every process has read the file before the main one rewrites it
    if acc.is_main_process:
        if total > loaded:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            cache.save(path)
        print(f"prompt cache: {total} prompt encodings ({loaded} read from {path}); "
              f"{', '.join(moved)} moved off the device")


def run_config(cfg: RecipeConfig) -> dict[str, Any]:
    """The recipe-level settings stored with every checkpoint (the GRPO ones are stored by the trainer)."""
    out = cfg.to_dict()
    out.pop("grpo")
    return out


# ---- the two phases ---------------------------------------------------------------------------------
def prepare(cfg: RecipeConfig) -> Checked:
    """Everything checkable before the model loads; on success the main process holds the run folder
    (the caller releases it: :func:`tpm.grpo.checkpoint.release_lock`)."""
    from accelerate.utils import broadcast_object_list

    from tpm.grpo import checkpoint as ckpt
    from tpm.grpo.trainer import make_accelerator

    g = cfg.grpo
    check_size(cfg)
    baselines = {label: fixed_policy(spec) for label, spec in cfg.baselines.items()}
    reward = build_reward(cfg)
    acc = make_accelerator(g)
    g.check_processes(acc.num_processes)
    error = [None]
    if acc.is_main_process:  # the run folder is this process's until the report is written
        try:
            ckpt.preflight(g, run_config(cfg))
        except ConfigError as e:
            ckpt.release_lock(g.output_dir)
            error = [str(e)]
    if acc.num_processes > 1:  # every process stops, not only the one that found the problem
        broadcast_object_list(error)
    if error[0] is not None:
        raise GRPOConfigError(error[0])
    return Checked(baselines, reward, acc)


def build(cfg: RecipeConfig, checked: Checked) -> Run:
    """Load the prompts and the model, fill ``sample_kwargs`` from it, cache the prompts if asked, build the
    policy and warm-start it (not on a resume: the checkpoint holds the weights)."""
    from tpm.backbones import get_backbone
    from tpm.loading import load_model, load_prompts

    g, acc = cfg.grpo, checked.accelerator
    train = load_prompts(cfg.train_prompts, column=cfg.prompt_column, split=cfg.train_split)
    evals = (load_prompts(cfg.eval_prompts, column=cfg.prompt_column, split=cfg.eval_split)[: g.eval_prompts]
             if g.eval_prompts else [])
    lora = {"lora": cfg.lora} if cfg.lora is not None else {}
    pipe = load_model(cfg.model, cfg.dtype, device=acc.device, **lora)
    backbone = get_backbone(pipe)
    try:
        backbone.resolve_size(g.height, g.width)
    except ValueError as e:
        raise GRPOConfigError(f"grpo.height / grpo.width: {e}") from None
    if not g.sample_kwargs:
        g = dataclasses.replace(g, sample_kwargs=backbone.sample_kwargs())
    cfg = dataclasses.replace(cfg, grpo=g)
    if cfg.prompt_cache:
        prompt_cache(cfg, pipe, train + evals, acc)
    policy = build_policy(cfg, pipe, g.seed)
    if g.resume is None:
        fit = warm_start(cfg, policy, pipe, quiet=not (g.progress and acc.is_main_process))
        if fit is not None and acc.is_main_process:
            print(f"warm start: imitated {cfg.warm_start} (squared error of the action parts: "
                  + ", ".join(f"{k} {v:.2g}" for k, v in fit.items()) + ")")
    return Run(cfg, acc, pipe, policy, copy.deepcopy(policy), checked.reward, checked.baselines, train, evals)
