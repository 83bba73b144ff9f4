"""The GRPO training configuration: one typed dataclass, a sentence of help per field.

Counts are in samples (images) unless a field says otherwise; "per process" means per
``accelerate`` process. Invalid combinations are rejected in ``__post_init__`` with a message
that says which field to change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tpm.typed_config import ConfigError, coerce, field_types


class GRPOConfigError(ConfigError):
    """A GRPO configuration that cannot run; the message names the field to change."""


RATIO_MODES = ("trajectory", "step")
GROUP_NOISE = ("distinct", "shared")
ADVANTAGE_SCALES = ("group", "batch")
ADVANTAGE_BASELINES = ("group", "james_stein")
LR_SCHEDULES = ("constant", "cosine")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")
# Fields a resumed run may change: they decide how long and how visibly it runs, not what it learns.
RESUMABLE_CHANGES = ("output_dir", "resume", "overwrite", "accept_config_changes", "max_iterations", "save_every",
                     "keep_checkpoints", "eval_every", "progress", "report_to")


@dataclass
class GRPOConfig:
    # --- where and how long -------------------------------------------------------------------
    output_dir: str = field(default="outputs/grpo", metadata={"help": "Run folder: checkpoints/, logs/, policy/."})
    max_iterations: int = field(default=4000, metadata={"help": "GRPO iterations (one batch of rollouts each)."})
    seed: int = field(default=42, metadata={"help": "Seeds prompt order, initial noises, action sampling and shuffles."})
    resume: bool | str | None = field(default=None, metadata={
        "help": "Continue a run: 'latest' (or true) = the newest checkpoint in output_dir, or a checkpoint / run "
                "folder path. Refused when the config differs from the checkpoint's (see accept_config_changes)."})
    accept_config_changes: bool = field(default=False, metadata={
        "help": "On resume, continue although the config differs from the checkpoint's (the changes are printed). "
                "max_iterations, save_every, keep_checkpoints, eval_every, progress and report_to may always change."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a previous run in output_dir: it is moved aside and deleted once the new run has "
                "completed its first iteration (restored if the new run fails before)."})
    report_to: str = field(default="tensorboard", metadata={
        "help": "Experiment trackers, through accelerate: tensorboard, wandb (pip install tpm[wandb]), several "
                "separated by commas, 'all' or 'none'. Logs go to output_dir/logs."})
    # --- rollouts -----------------------------------------------------------------------------
    group_size: int = field(default=16, metadata={
        "help": "G: samples per prompt from different noises (AsyncDiff: 16); at least 2, a group's mean is the baseline."})
    batch_size: int = field(default=16, metadata={
        "help": "Samples per iteration over all processes; a multiple of group_size (batch_size / G prompts)."})
    group_noise: str = field(default="distinct", metadata={
        "help": "'distinct': each sample of a group starts from its own noise (AsyncDiff); 'shared': the whole "
                "group starts from one noise, so rewards within a group differ only by the policy's draws."})
    rollout_batch_size: int = field(default=16, metadata={
        "help": "Samples denoised together per backbone call, per process (memory knob only)."})
    num_inference_steps: int | None = field(default=None, metadata={
        "help": "Sampling steps K (AsyncDiff: 10 Flux, 15 SD3.5); None = the pipeline's default."})
    height: int | None = field(default=None, metadata={"help": "Image height in pixels; None = pipeline default."})
    width: int | None = field(default=None, metadata={"help": "Image width in pixels; None = pipeline default."})
    sample_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Extra tpm.sample arguments (guidance_scale, true_cfg_scale, negative_prompt, ...)."})
    # --- optimisation -------------------------------------------------------------------------
    minibatch_size: int = field(default=4, metadata={
        "help": "Samples per minibatch of the update, over all processes (each replays the members it holds), "
                "so a run's numbers do not depend on the process count."})
    gradient_accumulation: int = field(default=1, metadata={"help": "Minibatches per optimizer step."})
    epochs: int = field(default=1, metadata={"help": "Passes over each iteration's rollouts."})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate (AsyncDiff: 2e-5 Flux, 1e-5 SD3.5)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_iterations: int = field(default=0, metadata={"help": "Linear learning-rate warm-up, in iterations."})
    lr_schedule: str = field(default="constant", metadata={
        "help": "'constant' (AsyncDiff) or 'cosine': decay to 0 at max_iterations, so the exported policy is "
                "not the last noisy step of a random walk."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip (AsyncDiff: 1.0); 0 disables it."})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range epsilon (AsyncDiff Eq. 14: 0.2)."})
    ratio: str = field(default="trajectory", metadata={
        "help": "'trajectory': one ratio of summed step log-probs per sample (Eq. 14-15); 'step': a ratio per step."})
    kl_coef: float = field(default=0.0, metadata={
        "help": "Weight of KL(policy || frozen initial policy) per decision; 0 disables it."})
    adv_eps: float = field(default=1e-4, metadata={"help": "eps in (R - mean_group) / (std + eps)."})
    advantage_scale: str = field(default="group", metadata={
        "help": "'group': divide by each group's std (GRPO, AsyncDiff); 'batch': by one std of the batch's "
                "group-centred rewards, so groups weigh by how much their rewards differ."})
    advantage_baseline: str = field(default="group", metadata={
        "help": "'group': each group's mean (GRPO); 'james_stein': group means shrunk toward the batch mean "
                "(lower gradient variance when prompts differ little)."})
    ema_decay: float = field(default=0.0, metadata={
        "help": "Keep an exponential moving average of the policy weights, updated after every iteration with "
                "this decay (0.99: about the last 100 iterations); evaluations, keep_best and the exported "
                "policy then use the average instead of the last noisy step. 0 disables it."})
    # --- bookkeeping --------------------------------------------------------------------------
    eval_every: int = field(default=0, metadata={"help": "Evaluate on held-out prompts every N iterations; 0 = only at the end."})
    eval_prompts: int = field(default=8, metadata={"help": "Held-out prompts used per evaluation (deterministic actions)."})
    eval_noise_sets: int = field(default=1, metadata={
        "help": "Noises per held-out prompt; an evaluation averages each prompt's scores over them."})
    keep_best: bool = field(default=False, metadata={
        "help": "Export the policy of the evaluation (the start or every eval_every iterations) with the best "
                "held-out reward, instead of the last one; the last one is kept in policy_last/."})
    save_every: int = field(default=50, metadata={"help": "Write a checkpoint every N iterations; 0 = only the last."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept on disk (oldest deleted first)."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise GRPOConfigError(msg)

        types = field_types(GRPOConfig)
        try:  # every field to its annotated type (YAML reads 1e-4 as a string; 2.5 is no iteration count)
            for f in dataclasses.fields(self):
                setattr(self, f.name, coerce(getattr(self, f.name), types[f.name], f.name))
        except GRPOConfigError:
            raise
        except ConfigError as e:
            raise GRPOConfigError(str(e)) from None
        if self.resume is True:
            self.resume = "latest"
        elif self.resume is False or self.resume == "":
            self.resume = None

        for name in ("max_iterations", "group_size", "batch_size", "rollout_batch_size", "minibatch_size",
                     "gradient_accumulation", "epochs", "keep_checkpoints", "eval_noise_sets"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_iterations", "eval_every", "save_every", "eval_prompts"):
            need(int(getattr(self, name)) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.group_size >= 2,
             f"group_size must be at least 2, got {self.group_size}: an advantage is a reward relative to the other "
             "samples of its prompt's group, so a group of one learns nothing")
        need(self.batch_size % self.group_size == 0,
             f"batch_size ({self.batch_size}) must be a multiple of group_size ({self.group_size}): every prompt "
             f"gets a full group; set batch_size to {max(1, round(self.batch_size / self.group_size)) * self.group_size}")
        need(self.ratio in RATIO_MODES, f"ratio must be one of {RATIO_MODES}, got {self.ratio!r}")
        need(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        need(self.group_noise in GROUP_NOISE, f"group_noise must be one of {GROUP_NOISE}, got {self.group_noise!r}")
        need(self.advantage_scale in ADVANTAGE_SCALES,
             f"advantage_scale must be one of {ADVANTAGE_SCALES}, got {self.advantage_scale!r}")
        need(self.advantage_baseline in ADVANTAGE_BASELINES,
             f"advantage_baseline must be one of {ADVANTAGE_BASELINES}, got {self.advantage_baseline!r}")
        for name in ("learning_rate", "clip_eps", "adv_eps"):
            v = float(getattr(self, name))
            need(math.isfinite(v) and v > 0, f"{name} must be a positive number, got {v}")
        for name in ("weight_decay", "max_grad_norm", "kl_coef"):
            v = float(getattr(self, name))
            need(math.isfinite(v) and v >= 0, f"{name} must be a number >= 0, got {v}")
        need(0.0 <= float(self.ema_decay) < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(not (self.resume is not None and self.overwrite), "resume and overwrite exclude each other: pick one")
        need(not self.keep_best or self.eval_prompts > 0,
             "keep_best selects on held-out evaluations: set eval_prompts > 0 (and eval_every)")
        if self.num_inference_steps is not None:
            need(self.num_inference_steps >= 1, f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        for name in ("height", "width"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"{name} must be a positive number of pixels, got {v}")
        trackers = self.trackers()
        known = TRACKERS + ("all",)
        need(all(t in known for t in trackers),
             f"report_to must name trackers among {known} (or 'none'), separated by commas; got {self.report_to!r}")
        need(isinstance(self.sample_kwargs, dict), "sample_kwargs must be a mapping of tpm.sample arguments")

    def trackers(self) -> list[str]:
        """``report_to`` as a list for ``accelerate.Accelerator(log_with=...)`` (empty: no tracker)."""
        names = [t.strip().lower() for t in self.report_to.split(",") if t.strip()]
        return [] if names in ([], ["none"]) else names

    def check_processes(self, num_processes: int) -> int:
        """Samples per process; raises when the batch does not split evenly over the processes.

        Groups may span processes (advantages are computed on the gathered batch), so only the
        batch itself must split.
        """
        if self.batch_size % num_processes:
            fewer = max(k for k in range(1, num_processes) if self.batch_size % k == 0)
            raise GRPOConfigError(
                f"batch_size ({self.batch_size}) must be divisible by the number of processes ({num_processes}); "
                f"set batch_size to a multiple of {math.lcm(num_processes, self.group_size)} or launch {fewer} "
                "processes")
        return self.batch_size // num_processes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
