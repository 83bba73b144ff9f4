"""The training entry point: ``tpm train``, ``accelerate launch -m tpm train`` and the recipes call :func:`main`.

A run reads as three calls (:func:`run`)::

    run = build(cfg, prepare(cfg))           # tpm.app.build: checks, then pipe, policy, reward, prompts
    trainer = GRPOTrainer(run.cfg.grpo, run.policy, run.pipe, run.reward, run.train_prompts, ...)
    result = trainer.train()                 # tpm.grpo
    report = finish(run, trainer)            # tpm.app.report: held-out report, config.yaml

``cfg`` is a :class:`RecipeConfig` (a shipped preset, a YAML file and command-line flags, every field
typed and checked: :mod:`tpm.app.recipe`). Like the rest of :mod:`tpm.app`, this turns names into
``policies`` and ``rewards`` objects; ``tpm`` below ``tpm.app`` never imports those packages.

Everything a user can get wrong is checked before the model loads (:func:`tpm.app.build.prepare`):
the config's types and ranges, the run folder (locked for this process; ``--resume`` refuses a
changed config unless ``--accept-config-changes``), the image size against the model's token size
when its config is readable, the policies and rewards named.
"""

from __future__ import annotations

from typing import Any

from tpm.app.build import build, build_reward, check_resume, check_size, fixed_policy, prepare, run_config  # noqa: F401
from tpm.app.recipe import TRAINABLE, RecipeConfig, config_yaml, parse_args  # noqa: F401  (a run's config)
from tpm.typed_config import ConfigError


def run(cfg: RecipeConfig) -> Any:
    """Check, build everything, train, report on the held-out prompts."""
    from tpm.app.report import announce, finish
    from tpm.grpo import checkpoint as ckpt
    from tpm.grpo.trainer import GRPOTrainer

    checked = prepare(cfg)
    acc = checked.accelerator
    try:
        run = build(cfg, checked)
        trainer = GRPOTrainer(run.cfg.grpo, run.policy, run.pipe, run.reward, run.train_prompts, run.eval_prompts,
                              accelerator=acc, run_config=run_config(run.cfg))
        result = trainer.train(end=False)  # the report still evaluates across processes
        report = finish(run, trainer)
        acc.end_training()  # the trackers and the process group (main() closes the group on errors)
    finally:
        if acc.is_main_process:
            ckpt.release_lock(cfg.grpo.output_dir)
    if acc.is_main_process:
        announce(run, trainer, result, report)
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
