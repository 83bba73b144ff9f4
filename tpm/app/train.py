"""The training entry point: ``tpm train``, ``accelerate launch -m tpm train`` and the recipes call :func:`main`.

A run is a :class:`RecipeConfig` (a shipped preset, a YAML file and command-line flags, every field
typed and checked: :mod:`tpm.app.recipe`) turned into a pipeline, a policy, a reward and prompt lists,
optionally a warm start (the field policy imitating a fixed policy), then
:class:`tpm.grpo.GRPOTrainer`, then a held-out report. Like the rest of :mod:`tpm.app`, it turns
names into ``policies`` and ``rewards`` objects; ``tpm`` below ``tpm.app`` never imports those packages.

The report compares, on the held-out prompts with the same noise per prompt (paired), the
synchronous sampler at the run's step count and at ``reference_steps``, every fixed ``baselines``
policy at the run's step count, the policy before training (after any warm start) and after. Each
difference against the synchronous sampler at the same steps is a paired bootstrap interval over
prompts. It is printed, written to ``report.json`` / ``report.md`` and drawn as ``report.png``.

Everything a user can get wrong is checked before the model loads: the config's types and ranges,
the run folder (locked for this process; ``--resume`` refuses a changed config unless
``--accept-config-changes``), the image size against the model's token size when its config is
readable, the policies and rewards named.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import numpy as np

from tpm.app.recipe import TRAINABLE, RecipeConfig, config_yaml, parse_args  # noqa: F401  (a run's config)
from tpm.grpo.config import GRPOConfigError
from tpm.typed_config import ConfigError


# ---- building -------------------------------------------------------------------------------------
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


# ---- the run --------------------------------------------------------------------------------------
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


def run(cfg: RecipeConfig) -> Any:
    """Check, build everything, train, report on the held-out prompts."""
    from accelerate.utils import broadcast_object_list

    from tpm.backbones import get_backbone
    from tpm.grpo import checkpoint as ckpt
    from tpm.grpo.trainer import GRPOTrainer, make_accelerator
    from tpm.loading import load_model, load_prompts

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
    if acc.num_processes > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        raise GRPOConfigError(error[0])
    try:
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
        before = copy.deepcopy(policy)
        trainer = GRPOTrainer(g, policy, pipe, reward, train, evals, accelerator=acc, run_config=run_config(cfg))
        result = trainer.train(end=False)  # the report below still evaluates across processes
        if acc.is_main_process:
            with open(os.path.join(g.output_dir, "config.yaml"), "w") as f:  # rerun: --config OUTPUT/config.yaml
                f.write(config_yaml(dataclasses.replace(cfg, grpo=dataclasses.replace(
                    g, resume=None, overwrite=False, accept_config_changes=False))))
        if evals:
            report = held_out_report(trainer, before, baselines, cfg)
            if acc.is_main_process:
                write_report(report, trainer, g.output_dir)
        acc.end_training()  # the trackers and the process group (main() closes the group on errors)
    finally:
        if acc.is_main_process:
            ckpt.release_lock(g.output_dir)
    if acc.is_main_process:
        from tpm.model_card import write_run_cards  # README.md cards: backbone, reward, GRPO config, report

        write_run_cards(trainer.policy.card_info(), g.output_dir, dataclasses.asdict(cfg), report if evals else None)
        print(f"policy: {result.policy_dir}  (load with policies.load({result.policy_dir!r}))")
        if g.trackers():
            hint = f"; tensorboard --logdir {result.log_dir}" if "tensorboard" in g.trackers() else ""
            print(f"logs:   {result.log_dir}  ({', '.join(g.trackers())}{hint})")
        print(f"checkpoints: {os.path.join(g.output_dir, 'checkpoints')}")
    return result


def dry_run(cfg: RecipeConfig) -> str:
    """The plan of a run (:mod:`tpm.app.plan`), after the checks that need no model: the process count the
    launcher set up against the batch, the image size, the names of policies and rewards."""
    import torch

    from tpm.app.plan import describe
    from tpm.grpo.trainer import check_launch, launched_processes

    check_launch()
    processes = launched_processes()
    cfg.grpo.check_processes(processes)
    check_size(cfg)
    for spec in cfg.baselines.values():  # every name resolves
        fixed_policy(spec)
    build_reward(cfg, check=False)
    device = f"cuda ({torch.cuda.device_count()} visible)" if torch.cuda.is_available() else "cpu"
    return describe(cfg, processes, device)


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


def main(argv: list[str] | None = None, defaults: str | None = None, description: str = "",
         prog: str | None = None) -> Any:
    """Parse ``argv`` over preset ``defaults`` (a name in ``tpm/presets``), train; user errors become one
    line on stderr and exit status 1."""
    import sys

    from rewards import RewardError
    from tpm.backbones.base import BackboneError
    from tpm.loading import LoadError
    from tpm.policy import PolicyError

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv, defaults, description=description, prog=prog)
        if "--print-config" in argv:
            print(config_yaml(cfg), end="")
            return cfg
        if "--dry-run" in argv:
            print(dry_run(cfg))
            return cfg
        return run(cfg)
    except (ConfigError, PolicyError, RewardError, LoadError, BackboneError, FileNotFoundError) as e:  # user-fixable
        raise SystemExit(f"error: {e}") from None
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """A run that failed leaves its process group open, and a process that exits so aborts under torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # python -m tpm.app.train (python -m tpm train is the same)
    from tpm.app.train import main as _main  # the importable module's classes, not __main__'s copies

    _main()
