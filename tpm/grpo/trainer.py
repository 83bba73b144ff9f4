"""The GRPO loop: rollouts -> rewards -> group advantages -> PPO-clip epochs on the policy alone.

The loop wires small pieces: :mod:`~tpm.grpo.rollout` (sampling with the frozen backbone),
:mod:`~tpm.grpo.reward` (the reward contract), :mod:`~tpm.grpo.advantages` and
:mod:`~tpm.grpo.loss` (the maths), :mod:`~tpm.grpo.checkpoint` (run folders, exact resume),
:mod:`~tpm.grpo.evaluation` (held-out scores) and :mod:`~tpm.grpo.seeds` (named seed streams).
It uses only the :class:`tpm.policy.TrainablePolicy` contract of the policy: ``exploring``,
``log_prob(record)``, ``kl(record, reference)`` and ``decision_stats``.

- Every iteration draws ``batch_size / group_size`` prompts and gives each a group of
  ``group_size`` samples, each from its own seeded noise (``group_noise="distinct"``) or all from one
  (``"shared"``, as the ``grpo_flux`` preset does); the samples are split over ``accelerate``
  processes, each rolls out its share with the frozen backbone under ``no_grad``.
- Rewards are gathered from all processes before the group advantages are computed, so groups
  may span processes; a NaN reward skips the iteration (logged) and training goes on.
- Every random draw is seeded by global coordinates (iteration, sample index in the whole batch,
  epoch), never by a process index, so N processes train the policy 1 process trains, up to float
  summation order: rewards are gathered before the group advantages; minibatches are drawn from the
  whole batch and each process replays the members it holds.
- The update replays the stored records through the policy network only, for ``epochs`` passes
  of minibatches. Gradients are summed over processes by hand (one ``all_reduce`` through
  ``accelerator.reduce``) because replay calls ``policy.log_prob``, not ``forward``, which DDP's
  wrapper would need; identical start weights (broadcast from process 0) and identical reduced
  gradients keep the processes' weights identical. Only the main process takes the run folder's
  lock and writes files.
- ``ema_decay`` keeps an exponential moving average of the trainable weights (Polyak averaging), one
  ``lerp`` per iteration, written by hand because it must live in the checkpoint as safetensors for an
  exact resume; evaluations, ``keep_best`` and the export see the average, which smooths the noisy
  walk that GRPO on a small reward takes between evaluations.
- With the policy, optimizer, scheduler and RNG states restored, ``resume`` continues exactly as the
  uninterrupted run would have, because every draw is seeded from its own coordinates.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tpm.grpo import checkpoint as ckpt
from tpm.grpo.advantages import advantage_stats, group_advantages
from tpm.grpo.config import GRPOConfig, GRPOConfigError
from tpm.grpo.evaluation import EvalResult, evaluate
from tpm.grpo.loss import ppo_clip_loss, trajectory_log_prob
from tpm.grpo.reward import TrainingReward, training_reward
from tpm.grpo.rollout import RolloutBatch, rollout
from tpm.grpo.seeds import Stream, seed_for
from tpm.policy import TrainablePolicy

logger = logging.getLogger("tpm.grpo")
EXTREMES = ("ratio/min", "ratio/max")  # update statistics combined by min / max, not by a mean


def make_accelerator(config: GRPOConfig, **kwargs):
    """An ``accelerate.Accelerator`` logging to ``config.report_to`` in OUTPUT/logs; a tracker whose package
    is missing is an error (accelerate would drop it silently)."""
    from accelerate import Accelerator
    from accelerate.tracking import get_available_trackers

    names = config.trackers()
    available = {str(t) for t in get_available_trackers()}
    missing = [t for t in names if t != "all" and t not in available]
    if missing:
        raise GRPOConfigError(f"report_to {config.report_to!r}: the package for {', '.join(missing)} is not "
                              f"installed (pip install {' '.join(missing)}; wandb: pip install 'tpm[wandb]'), or "
                              "use report_to: tensorboard")
    check_launch()
    if "cpu" not in kwargs and launched_processes() > 1 and not _has_accelerator_device():
        # accelerate picks gloo for several processes only when told to run on the CPU; torchrun and
        # `accelerate launch --multi_gpu` on a machine without GPUs would otherwise give N processes
        # that each believe they are the only one
        kwargs["cpu"] = True
    return Accelerator(log_with=names or None, project_dir=os.path.join(config.output_dir, "logs"), **kwargs)


def launched_processes() -> int:
    """The process count the launcher set up (torchrun / accelerate / MPI environment), 1 without one."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def _has_accelerator_device() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def check_launch() -> None:
    """Refuse ``accelerate launch --cpu --num_processes N`` (N > 1): without an MPI hostfile accelerate then
    starts one process (it sets a master address for the N it was asked for, but no process count), so the
    run would silently use one process."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if flag and "MASTER_ADDR" in os.environ and launched_processes() == 1 and "RANK" not in os.environ:
        raise GRPOConfigError(
            "accelerate launch --cpu with several processes starts only one (it needs mpirun for more); for N CPU "
            "processes run `accelerate launch --multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N "
            "...` (without GPUs tpm runs them on the CPU with gloo), or drop --num_processes for one process")


def lr_factor(config: GRPOConfig, iteration: int) -> float:
    """Learning-rate multiplier after ``iteration`` updates: linear warm-up, then constant or cosine to 0."""
    warm = config.warmup_iterations
    factor = min(1.0, (iteration + 1) / (warm + 1)) if warm else 1.0
    if config.lr_schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * min(iteration, config.max_iterations) / config.max_iterations))
    return factor


@dataclass
class TrainResult:
    output_dir: str
    policy_dir: str
    log_dir: str
    iterations: int
    history: list[dict[str, float]] = field(default_factory=list)
    initial_eval: dict[str, float] | None = None  # held-out means before training
    final_eval: dict[str, float] | None = None  # ... and after


class GRPOTrainer:
    """Trains ``policy`` on ``pipe`` (frozen) with ``reward``; see the module docstring.

    Args:
        config: a :class:`GRPOConfig`.
        policy: a :class:`tpm.policy.TrainablePolicy`.
        pipe: a diffusers pipeline ``tpm.sample`` accepts (or a backbone adapter); never trained.
        reward: a :class:`tpm.grpo.reward.TrainingReward`, or a callable ``(images, prompts) -> scores``
            (with ``combine`` when it returns a mapping of metrics).
        train_prompts / eval_prompts: prompt lists; eval prompts are scored with deterministic actions.
        accelerator: an ``accelerate.Accelerator``; by default :func:`make_accelerator` (``report_to``).
        run_config: JSON-able settings beyond ``config`` (the recipe's model, policy, rewards...), stored in
            every checkpoint so that a resume can refuse a changed run (:func:`tpm.grpo.checkpoint.config_changes`).
    """

    def __init__(self, config: GRPOConfig, policy: TrainablePolicy, pipe, reward: Callable | TrainingReward,
                 train_prompts: Sequence[str], eval_prompts: Sequence[str] | None = None, *, accelerator=None,
                 combine: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
                 run_config: dict[str, Any] | None = None):
        if not isinstance(policy, TrainablePolicy):
            raise GRPOConfigError(f"{type(policy).__name__} cannot be trained with GRPO: it is not a "
                                  "TrainablePolicy (use policies.TPM, policies.VelocityScale or policies.FieldPolicy)")
        if not train_prompts:
            raise GRPOConfigError("train_prompts is empty; give at least one training prompt")
        self.config = config
        self.policy = policy
        self.pipe = pipe
        self.reward = training_reward(reward, combine)
        self.train_prompts = list(train_prompts)
        self.eval_prompts = list(eval_prompts or [])[: config.eval_prompts] if config.eval_prompts else []
        self.log_dir = os.path.join(config.output_dir, "logs")
        self.run_config = dict(run_config or {})
        self.accelerator = accelerator = accelerator if accelerator is not None else make_accelerator(config)
        self.local_batch = config.check_processes(accelerator.num_processes)
        self.device = accelerator.device
        self.policy.to(self.device)
        for p in pipe.components.values() if hasattr(pipe, "components") else []:
            if isinstance(p, torch.nn.Module):
                p.requires_grad_(False)
        self.named_params = {k: p for k, p in self.policy.named_parameters() if p.requires_grad}
        self.params = list(self.named_params.values())
        if not self.params:
            raise GRPOConfigError(f"{type(policy).__name__} has no trainable parameters")
        # ema_decay: the moving average of the trainable weights (None: off)
        self.ema: dict[str, torch.Tensor] | None = (
            {k: p.detach().clone() for k, p in self.named_params.items()} if config.ema_decay > 0 else None)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(config, it))
        self.reference = None
        if config.kl_coef > 0:
            self.reference = copy.deepcopy(policy).requires_grad_(False).eval()
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.initial_eval: dict[str, float] | None = None
        # keep_best: the best held-out summary so far, its iteration and the policy weights then (CPU)
        self.best: dict[str, Any] = {"score": None, "iteration": None}
        self.best_weights: dict[str, torch.Tensor] | None = None
        # every held-out evaluation: iteration and, per metric, [mean, low, high] (protocol interval over prompts)
        self.evaluations: list[dict[str, Any]] = []

    # ---- output folder and checkpoints -----------------------------------------------------------
    def _prepare_output(self) -> None:
        """Lock the run folder (main process), check it, move a run to overwrite aside, prune leftovers."""
        cfg = self.config
        clear, self._resume_changes = ckpt.preflight(cfg, self.run_config, main=self.accelerator.is_main_process,
                                                     barrier=self.accelerator.wait_for_everyone)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if clear:
                ckpt.set_aside(cfg.output_dir)
            os.makedirs(cfg.output_dir, exist_ok=True)
            ckpt.prune_checkpoints(cfg.output_dir, cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def latest_checkpoint(self) -> str | None:
        return ckpt.latest_checkpoint(self.config.output_dir)

    def check_resume(self, path: str) -> dict[str, tuple[Any, Any]]:
        """Config changes against checkpoint ``path``; raises unless they are accepted (``accept_config_changes``)."""
        return ckpt.resume_changes(self.config, self.run_config, path)

    def save_checkpoint(self) -> str | None:
        """Write checkpoint-<iteration> atomically (main process); returns its path there."""
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            state = {"history": self.history, "config": self.config.to_dict(), "initial_eval": self.initial_eval,
                     "best": self.best, "run_config": self.run_config, "evaluations": self.evaluations}
            path = ckpt.save_checkpoint(self.config.output_dir, self.iteration, self.policy, self.reference,
                                        self.optimizer, self.scheduler, state, self.config.keep_checkpoints,
                                        best=self.best_weights, ema=self.ema)
        acc.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str) -> None:
        state = ckpt.load_checkpoint(path, self.policy, self.reference, self.optimizer, self.scheduler, self.device)
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.initial_eval = state.get("initial_eval")
        self.best = state.get("best") or {"score": None, "iteration": None}
        self.best_weights = ckpt.load_best(path)
        if self.ema is not None:
            ema = ckpt.load_ema(path)
            if ema is None:
                raise GRPOConfigError(f"{path} holds no weight average (ema_decay was 0 when it was written); "
                                      "resume with ema_decay: 0 or start a new run")
            self.ema = {k: ema[k].to(self.device) for k in self.named_params}
        self.evaluations = list(state.get("evaluations") or [])

    # ---- one iteration ---------------------------------------------------------------------------
    def iteration_prompts(self, iteration: int) -> list[str]:
        """The ``batch_size / group_size`` prompts of an iteration: a seeded shuffle per pass over the data."""
        n_prompts = self.config.batch_size // self.config.group_size
        n = len(self.train_prompts)
        out = []
        for j in range(n_prompts):
            idx = iteration * n_prompts + j
            order = seed_for(self.config.seed, Stream.PROMPT_ORDER, idx // n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(order))
            out.append(self.train_prompts[int(perm[idx % n])])
        return out

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().to(self.device)
        if self.accelerator.num_processes == 1:
            return t.cpu()
        return self.accelerator.gather(t).cpu()

    def score(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gathered total reward (all processes, sample order) and gathered per-metric raw scores."""
        metrics = {k: self._gather(torch.as_tensor(v).reshape(-1)) for k, v in
                   self.reward.metrics(batch.images, batch.prompts).items()}
        finite = torch.stack([torch.isfinite(v) for v in metrics.values()]).all(0)
        if bool(finite.all()):
            total = torch.as_tensor(self.reward.combine(metrics)).float().reshape(-1)
        else:  # NaN where a metric failed; the iteration is skipped
            total = torch.where(finite, torch.zeros_like(finite, dtype=torch.float32), math.nan)
        if total.numel() != self.config.batch_size:
            raise GRPOConfigError(f"the reward returned {total.numel()} scores for {self.config.batch_size} samples")
        return total, metrics

    def rollout_iteration(self, iteration: int) -> RolloutBatch:
        cfg, acc = self.config, self.accelerator
        prompts = [p for p in self.iteration_prompts(iteration) for _ in range(cfg.group_size)]
        # "shared": one noise per group, so a group's rewards differ only by the policy's draws and the group
        # mean is a baseline for that very noise (far less variance than across noises).
        noise_of = (lambda j: j // cfg.group_size) if cfg.group_noise == "shared" else (lambda j: j)
        seeds = [seed_for(cfg.seed, Stream.NOISE, iteration, noise_of(j)) for j in range(cfg.batch_size)]
        # each sample's action draws are seeded by its place in the whole batch, not by the process that
        # rolls it out, so that any number of processes draws the same actions
        draws = [seed_for(cfg.seed, Stream.ACTIONS, iteration, j) for j in range(cfg.batch_size)]
        lo = acc.process_index * self.local_batch
        hi = lo + self.local_batch
        torch.manual_seed(seed_for(cfg.seed, Stream.SHARED_ACTIONS, iteration))
        self.policy.eval()
        batch = rollout(self.pipe, self.policy, prompts[lo:hi], seeds[lo:hi],
                        num_inference_steps=cfg.num_inference_steps, height=cfg.height, width=cfg.width,
                        rollout_batch_size=cfg.rollout_batch_size, sample_kwargs=cfg.sample_kwargs, explore=True,
                        action_seeds=draws[lo:hi])
        if batch.num_decisions == 0:
            raise GRPOConfigError(f"{type(self.policy).__name__} took no decision in a rollout of "
                                  f"{cfg.num_inference_steps} steps; nothing to train")
        return batch

    def update(self, batch: RolloutBatch, advantages: torch.Tensor, iteration: int) -> dict[str, float]:
        """Epochs of PPO-clip minibatches over the stored rollouts; returns averaged statistics.

        Minibatches are drawn from the *whole* batch (a seeded permutation of the global sample
        indices, ``minibatch_size`` samples each), whatever the number of processes. Each process
        replays the samples of the minibatch it holds (possibly none) and scales its loss to its
        share of the global mean; the gradients are then summed over processes, which gives the
        gradient of the 1-process minibatch mean up to float summation order.
        """
        cfg, policy, acc = self.config, self.policy, self.accelerator
        policy.train()
        n, s = cfg.batch_size, batch.num_decisions
        lo = acc.process_index * self.local_batch
        adv = advantages.to(self.device)
        old = batch.log_probs.to(self.device)
        rows: list[torch.Tensor | None] = []  # per minibatch: [local samples, stats x samples (extremes as is)]
        names: list[str] = []
        n_mb = math.ceil(n / cfg.minibatch_size)
        grad_norms = []
        self.optimizer.zero_grad(set_to_none=True)
        for epoch in range(cfg.epochs):
            shuffle = seed_for(cfg.seed, Stream.SHUFFLE, iteration, epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle))
            for m in range(n_mb):
                members = order[m * cfg.minibatch_size:(m + 1) * cfg.minibatch_size]
                mine = members[(members >= lo) & (members < lo + self.local_batch)] - lo
                share = len(mine) / len(members)  # of the minibatch's mean that this process computes
                if len(mine):
                    loss, st = self._minibatch_loss(batch, mine, old, adv, s)
                    (loss * share / cfg.gradient_accumulation).backward()
                    if not names:
                        names = sorted(st)
                    rows.append(torch.tensor([len(mine), *(float(st[k]) * (1 if k in EXTREMES else len(mine))
                                                           for k in names)]))
                else:
                    rows.append(None)
                if (m + 1) % cfg.gradient_accumulation == 0 or m == n_mb - 1:
                    grad_norms.append(self._optimizer_step())
        return self._update_stats(rows, names, grad_norms)

    def _minibatch_loss(self, batch: RolloutBatch, idx: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
                        s: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean PPO-clip loss (+ KL) over the local samples ``idx`` and its detached statistics."""
        cfg, policy = self.config, self.policy
        record = {k: v.to(self.device) for k, v in batch.records(idx).items()}
        logp = policy.log_prob(record).view(len(idx), s)
        if cfg.ratio == "trajectory":
            loss, st = ppo_clip_loss(trajectory_log_prob(logp), trajectory_log_prob(old[idx]), adv[idx],
                                     cfg.clip_eps)
        else:
            loss, st = ppo_clip_loss(logp, old[idx], adv[idx], cfg.clip_eps)
        if self.reference is not None:
            kl = policy.kl(record, self.reference).mean()
            loss = loss + cfg.kl_coef * kl
            st["kl"] = kl.detach()
        st["loss"] = loss.detach()
        return loss, st

    def _update_stats(self, rows: list[torch.Tensor | None], names: list[str], grad_norms: list[float]) -> dict:
        """Statistics of the update over all processes: means weighted by samples (the minimum and maximum
        ratio as such), ``first_ratio`` from the first minibatch."""
        # every process replays at least one sample per epoch (each sample is in some minibatch), so each
        # knows the statistics' names and holds a row per minibatch
        k = len(names)
        table = torch.stack([r if r is not None else torch.zeros(k + 1) for r in rows])
        table = self._gather(table[None]).reshape(-1, len(rows), k + 1)  # (processes, minibatches, 1 + k)
        count = table[..., 0]
        stats: dict[str, float] = {}
        for i, name in enumerate(names):
            vals = table[..., 1 + i]
            if name in EXTREMES:
                lowest = name == "ratio/min"
                vals = torch.where(count > 0, vals, math.inf if lowest else -math.inf)
                stats[f"train/{name}"] = float(vals.min() if lowest else vals.max())
            else:
                stats[f"train/{name}"] = float(vals.sum() / count.sum())
        stats["train/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        first = table[:, 0]
        ratio = names.index("ratio/mean") + 1 if "ratio/mean" in names else None
        stats["train/first_ratio"] = float(first[:, ratio].sum() / first[:, 0].sum()) if ratio is not None else 1.0
        return stats

    def _reduce_gradients(self) -> None:
        """Sum every gradient over processes (one flat all-reduce through ``accelerator.reduce``); each
        process has already scaled its loss to its share of the minibatch mean."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _optimizer_step(self) -> float:
        self._reduce_gradients()
        if self.config.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        else:
            grads = [p.grad.norm() for p in self.params if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train_iteration(self) -> dict[str, float]:
        """Run iteration ``self.iteration`` (rollouts, rewards, update) and advance the counter."""
        cfg, it = self.config, self.iteration
        batch = self.rollout_iteration(it)
        total, metrics = self.score(batch)
        record: dict[str, float] = {"iteration": it}
        for k, v in metrics.items():
            finite = v[torch.isfinite(v)]
            record[f"reward/{k}"] = float(finite.mean()) if finite.numel() else math.nan
        bad = int((~torch.isfinite(total)).sum())
        if bad:
            logger.warning("iteration %d: the reward returned %d non-finite score(s); iteration skipped", it, bad)
            record.update({"skipped": 1.0, "reward/nonfinite": float(bad)})
        else:
            adv = group_advantages(total, cfg.group_size, cfg.adv_eps, cfg.advantage_scale, cfg.advantage_baseline)
            lo = self.accelerator.process_index * self.local_batch
            record.update({"skipped": 0.0, "reward/total": float(total.mean()), **advantage_stats(adv)})
            actions = {k: self._gather(v.flatten(1)).view(-1, *v.shape[1:]) for k, v in batch.actions.items()}
            record.update(self.policy.decision_stats(actions))
            record.update(self.update(batch, adv[lo:lo + self.local_batch], it))
            self._update_average()
            self.scheduler.step()  # the schedule counts iterations that updated the policy
        record["lr"] = float(self.scheduler.get_last_lr()[0])
        record["bytes_per_sample_step"] = batch.stored_bytes() / max(1, len(batch) * batch.num_decisions)
        self.iteration += 1
        self.history.append(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "iteration"}, step=it)
        return record

    # ---- weight average (ema_decay) --------------------------------------------------------------
    def _update_average(self) -> None:
        """ema <- ema + (1 - decay) (weights - ema), once per iteration that updated the policy."""
        if self.ema is None:
            return
        with torch.no_grad():
            for k, p in self.named_params.items():
                self.ema[k].lerp_(p.detach(), 1.0 - self.config.ema_decay)

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Inside, the policy holds the averaged weights (ema_decay); the trained ones are put back after.
        Without an average it changes nothing."""
        if self.ema is None:
            yield
            return
        raw = {k: p.detach().clone() for k, p in self.named_params.items()}
        self._set_weights(self.ema)
        try:
            yield
        finally:
            self._set_weights(raw)

    def _set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy ``weights`` (by parameter name) into the trainable parameters, in place."""
        with torch.no_grad():
            for k, p in self.named_params.items():
                p.copy_(weights[k])

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate(self, prompts: Sequence[str] | None = None, policy: Any = "trained", *, seed: int = 0,
                 num_inference_steps: int | None = None, keep_images: int = 0) -> EvalResult | None:
        """Held-out scores of the trained policy (``policy="trained"``), of ``None`` (synchronous) or of any
        fixed policy, on the evaluation noises (:mod:`tpm.grpo.evaluation`) with this run's sampling settings."""
        prompts = list(self.eval_prompts if prompts is None else prompts)
        if not prompts:
            return None
        cfg = self.config
        pol = self.policy if isinstance(policy, str) and policy == "trained" else policy
        return evaluate(self.pipe, pol, prompts, self.reward, accelerator=self.accelerator, seed=seed,
                        noise_sets=cfg.eval_noise_sets, num_inference_steps=num_inference_steps or cfg.num_inference_steps, height=cfg.height,
                        width=cfg.width, rollout_batch_size=cfg.rollout_batch_size, sample_kwargs=cfg.sample_kwargs,
                        keep_images=keep_images)

    def _log_eval(self, result: EvalResult | None, step: int) -> dict[str, float] | None:
        if result is None:
            return None
        means = result.means()
        from tpm.comparison.protocol import mean_interval, rounded

        self.evaluations = [e for e in self.evaluations if e["iteration"] != step]  # the final one may repeat
        self.evaluations.append({"iteration": step, **{k: rounded(mean_interval(v), 5)
                                                       for k, v in result.metrics.items()}})
        if self.config.keep_best:
            score = self.reward.summarise({k: float(np.mean(v)) for k, v in result.metrics.items()})
            if self.best["score"] is None or score > self.best["score"]:
                self.best = {"score": score, "iteration": step}
                self.best_weights = {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}
        self.accelerator.log({f"eval/{k}": v for k, v in means.items()}, step=step)
        if result.images is not None and self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                if hasattr(tracker, "log_images"):
                    tracker.log_images({"eval/samples": result.images.clamp(0, 1)}, step=step)
        return means

    # ---- the loop --------------------------------------------------------------------------------
    def train(self, end: bool = True) -> TrainResult:
        """Train, export, return the result; the run folder is locked meanwhile (see :mod:`tpm.grpo.checkpoint`).

        ``end``: close the trackers and the process group afterwards (``accelerator.end_training``); pass
        False to evaluate further across processes, and call it yourself.
        """
        try:
            self._prepare_output()
            return self._train(end)
        except BaseException:
            # failed before its first iteration completed: the overwritten run is put back (a no-op after)
            if self.accelerator.is_main_process and self.config.overwrite:
                ckpt.restore_previous(self.config.output_dir)
            raise
        finally:
            if self.accelerator.is_main_process:
                ckpt.release_lock(self.config.output_dir)

    def _train(self, end: bool) -> TrainResult:
        cfg, acc = self.config, self.accelerator
        if cfg.resume is not None:
            path = ckpt.resume_checkpoint(cfg)
            changes = self._resume_changes  # checked by _prepare_output
            self.load_checkpoint(path)
            if acc.is_main_process:
                accepted = (" with changed " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
                            if changes else "")
                print(f"resumed from {path} at iteration {self.iteration} of {cfg.max_iterations}{accepted}",
                      flush=True)
        elif acc.num_processes > 1:
            from accelerate.utils import broadcast

            for p in self.policy.parameters():
                p.data.copy_(broadcast(p.data.clone(), from_process=0))
        acc.init_trackers("grpo", config={k: v for k, v in cfg.to_dict().items()
                                          if isinstance(v, (int, float, str, bool))})
        keep = 16
        if self.eval_prompts and self.iteration == 0:
            with self.averaged():
                self.initial_eval = self._log_eval(self.evaluate(keep_images=keep), 0)
        bar = tqdm(total=cfg.max_iterations, initial=self.iteration, desc="GRPO",
                   disable=not (cfg.progress and acc.is_main_process))
        while self.iteration < cfg.max_iterations:
            rec = self.train_iteration()
            if acc.is_main_process and len(self.history) == 1 and cfg.overwrite:
                ckpt.discard_previous(cfg.output_dir)  # the new run has started cleanly
            bar.update(1)
            bar.set_postfix(reward=rec.get("reward/total", math.nan), skipped=int(rec["skipped"]))
            done = self.iteration == cfg.max_iterations
            if cfg.eval_every and self.iteration % cfg.eval_every == 0 and not done and self.eval_prompts:
                with self.averaged():
                    self._log_eval(self.evaluate(keep_images=keep), self.iteration)
            if (cfg.save_every and self.iteration % cfg.save_every == 0) or done:
                self.save_checkpoint()
        bar.close()
        if self.ema is not None:  # from here on the run's policy is the average (the raw weights stay in checkpoints)
            self._set_weights(self.ema)
        final = self._log_eval(self.evaluate(keep_images=keep), self.iteration)
        policy_dir = os.path.join(cfg.output_dir, "policy")
        acc.wait_for_everyone()
        if acc.is_main_process and cfg.keep_best:
            self.policy.save_pretrained(os.path.join(cfg.output_dir, "policy_last"))
        if cfg.keep_best and self.best_weights is not None:  # every process holds the same weights
            self.policy.load_state_dict({k: v.to(self.device) for k, v in self.best_weights.items()})
            if acc.is_main_process:
                print(f"keep_best: exporting the policy of iteration {self.best['iteration']} (held-out "
                      f"{self.best['score']:.4f}); the last one is in {os.path.join(cfg.output_dir, 'policy_last')}")
        if acc.is_main_process:
            self.policy.save_pretrained(policy_dir)
            with open(os.path.join(cfg.output_dir, "run.json"), "w") as f:
                json.dump({"iterations": self.iteration, "processes": acc.num_processes,
                           "initial_eval": self.initial_eval, "final_eval": final,
                           "best": self.best if cfg.keep_best else None, "evaluations": self.evaluations,
                           "config": cfg.to_dict()}, f, indent=2)
        acc.wait_for_everyone()
        if end:
            acc.end_training()
        return TrainResult(cfg.output_dir, policy_dir, self.log_dir, self.iteration, self.history,
                           self.initial_eval, final)
