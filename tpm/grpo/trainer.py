"""The GRPO loop: rollouts -> rewards -> group advantages -> PPO-clip epochs on the policy alone.

Wires the pure pieces of ``tpm.grpo`` (rollout, advantages, loss) with ``accelerate`` for devices
and processes (SPEC §2):

- every iteration draws ``batch_size / group_size`` prompts and gives each a group of
  ``group_size`` samples with different seeded noises; the samples are split over processes,
  each process rolls out its share with the frozen backbone under ``no_grad``;
- rewards are gathered from all processes before the group advantages are computed, so groups
  may span processes; a reward with a NaN skips the iteration (logged) and training goes on;
- the update replays the stored inputs through the policy network only, for ``epochs`` passes
  of minibatches; gradients are averaged over processes by hand (an ``all_reduce`` through
  ``accelerator.reduce``) because replay calls ``policy.log_prob``, not ``forward``, which DDP's
  wrapper would need; identical start weights (broadcast from process 0) and identical averaged
  gradients keep the processes' weights identical;
- every random draw of iteration i is seeded from (seed, i): prompt order, noises, the policy's
  action draws and minibatch shuffles; with the policy, optimizer and scheduler states restored,
  ``resume`` therefore continues exactly as the uninterrupted run would have;
- checkpoints are written to a temporary folder and renamed (atomic on one filesystem). We do
  not use ``accelerator.save_state`` because its RNG files are pickles that need
  ``torch.load(weights_only=False)``; ours are safetensors, JSON and a ``weights_only`` file.

The reward is any callable ``reward(images, prompts)`` returning (N,) scores, or a mapping
metric -> (N,) raw scores together with ``combine(metrics) -> (N,)`` (e.g. AsyncDiff Eq. 16's
z-scored sum, applied to the gathered batch), or an object with ``.total`` / ``.metrics``.
``tpm`` does not import ``rewards`` or ``policies``: the recipe passes the objects in.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tpm.grpo.advantages import advantage_stats, group_advantages
from tpm.grpo.config import GRPOConfig, GRPOConfigError
from tpm.grpo.loss import beta_kl, ppo_clip_loss, trajectory_log_prob
from tpm.grpo.rollout import RolloutBatch, rollout
from tpm.policy import Policy

logger = logging.getLogger("tpm.grpo")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
RUN_MARKERS = (CHECKPOINTS, "policy", "run.json")


def seed_for(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and integers (iteration, sample index, ...)."""
    h = int(seed) & 0xFFFFFFFF
    for p in parts:
        h = (h * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return h


@dataclass
class TrainResult:
    output_dir: str
    policy_dir: str
    log_dir: str
    iterations: int
    history: list[dict[str, float]] = field(default_factory=list)
    initial_eval: dict[str, float] | None = None
    final_eval: dict[str, float] | None = None
    synchronous_eval: dict[str, float] | None = None  # the same prompts and noises, shared schedule


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    done = [d for d in os.listdir(root) if d.startswith("checkpoint-") and
            os.path.isfile(os.path.join(root, d, STATE_FILE))]
    if not done:
        return None
    return os.path.join(root, max(done, key=lambda d: int(d.split("-")[1])))


def check_output_dir(config: GRPOConfig) -> bool:
    """Refuse a folder holding another run unless resuming / overwriting; True if it must be cleared."""
    out = config.output_dir
    has_run = any(os.path.exists(os.path.join(out, m)) for m in RUN_MARKERS)
    if config.resume:
        if latest_checkpoint(out) is None:
            raise GRPOConfigError(f"--resume: {out} has no checkpoint to resume from; drop --resume to start")
        return False
    if has_run and not config.overwrite:
        raise GRPOConfigError(f"{out} holds another run; pass --resume to continue it, --overwrite to "
                              "replace it, or choose another --output-dir")
    return has_run


class GRPOTrainer:
    """Trains ``policy`` on ``pipe`` (frozen) with ``reward``; see the module docstring.

    Args:
        config: a :class:`GRPOConfig`.
        policy: a stochastic policy (``log_prob(extras, action)``, ``explore``, ``action_key``).
        pipe: a diffusers pipeline ``tpm.sample`` accepts; never trained.
        reward: the reward callable (contract above).
        train_prompts / eval_prompts: prompt lists; eval prompts are scored with deterministic actions.
        accelerator: an ``accelerate.Accelerator``; by default one logging to tensorboard in OUTPUT/logs.
        combine: maps gathered per-metric scores to the total reward (needed when ``reward`` returns a mapping).
    """

    def __init__(self, config: GRPOConfig, policy: Policy, pipe, reward: Callable, train_prompts: Sequence[str],
                 eval_prompts: Sequence[str] | None = None, *, accelerator=None,
                 combine: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None):
        if not getattr(policy, "stochastic", False) or not hasattr(policy, "log_prob"):
            raise GRPOConfigError(f"{type(policy).__name__} cannot be trained with GRPO: it has no log-probability "
                                  "(use a stochastic policy such as policies.TPM)")
        if not train_prompts:
            raise GRPOConfigError("train_prompts is empty; give at least one training prompt")
        self.config = config
        self.policy = policy
        self.pipe = pipe
        self.reward = reward
        self.combine = combine
        self.train_prompts = list(train_prompts)
        self.eval_prompts = list(eval_prompts or [])[: config.eval_prompts] if config.eval_prompts else []
        self.log_dir = os.path.join(config.output_dir, "logs")
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(log_with="tensorboard", project_dir=self.log_dir)
        self.accelerator = accelerator
        self.local_batch = config.check_processes(accelerator.num_processes)
        self.device = accelerator.device
        self.policy.to(self.device)
        for p in pipe.components.values() if hasattr(pipe, "components") else []:
            if isinstance(p, torch.nn.Module):
                p.requires_grad_(False)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self.params:
            raise GRPOConfigError(f"{type(policy).__name__} has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        warm = config.warmup_iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: min(1.0, (it + 1) / (warm + 1)) if warm else 1.0)
        self.reference = None
        if config.kl_coef > 0:
            self.reference = copy.deepcopy(policy).requires_grad_(False).eval()
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.initial_eval: dict[str, float] | None = None  # held-out reward before training

    # ---- output folder ------------------------------------------------------------------------
    def _prepare_output(self) -> None:
        cfg, out = self.config, self.config.output_dir
        if check_output_dir(cfg):
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                for m in (*RUN_MARKERS, "logs"):
                    path = os.path.join(out, m)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    elif os.path.exists(path):
                        os.remove(path)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            os.makedirs(out, exist_ok=True)

    def latest_checkpoint(self) -> str | None:
        return latest_checkpoint(self.config.output_dir)

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> str | None:
        """Write checkpoint-<iteration> atomically (main process); returns its path there."""
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            root = os.path.join(self.config.output_dir, CHECKPOINTS)
            os.makedirs(root, exist_ok=True)
            name = f"checkpoint-{self.iteration:06d}"
            tmp = os.path.join(root, f".tmp-{name}")
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            self.policy.save_pretrained(os.path.join(tmp, "policy"))
            if self.reference is not None:  # the KL anchor must survive a resume too
                self.reference.save_pretrained(os.path.join(tmp, "reference"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state()}, os.path.join(tmp, TRAINING_STATE))
            state = {"iteration": self.iteration, "history": self.history, "config": self.config.to_dict(),
                     "initial_eval": self.initial_eval,
                     "python_rng": _jsonable(random.getstate()),
                     "numpy_rng": _jsonable(np.random.get_state())}
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f)
            path = os.path.join(root, name)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
            done = sorted((d for d in os.listdir(root) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
            for old in done[: -self.config.keep_checkpoints]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        acc.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str) -> None:
        from safetensors.torch import load_file

        weights = os.path.join(path, "policy", "model.safetensors")
        self.policy.load_state_dict({k: v.to(self.device) for k, v in load_file(weights).items()}, strict=True)
        ref = os.path.join(path, "reference", "model.safetensors")
        if self.reference is not None and os.path.isfile(ref):
            self.reference.load_state_dict({k: v.to(self.device) for k, v in load_file(ref).items()}, strict=True)
        st = torch.load(os.path.join(path, TRAINING_STATE), weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["torch_rng"])
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.initial_eval = state.get("initial_eval")
        random.setstate(_python_state(state["python_rng"]))
        np.random.set_state(_numpy_state(state["numpy_rng"]))

    # ---- one iteration ------------------------------------------------------------------------
    def iteration_prompts(self, iteration: int) -> list[str]:
        """The ``batch_size / group_size`` prompts of an iteration: a seeded shuffle per pass over the data."""
        n_prompts = self.config.batch_size // self.config.group_size
        n = len(self.train_prompts)
        out = []
        for j in range(n_prompts):
            idx = iteration * n_prompts + j
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(self.config.seed, 7, idx // n)))
            out.append(self.train_prompts[int(perm[idx % n])])
        return out

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().to(self.device)
        if self.accelerator.num_processes == 1:
            return t.cpu()
        return self.accelerator.gather(t).cpu()

    def score(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gathered total reward (all processes, sample order) and gathered per-metric raw scores."""
        out = self.reward(batch.images, batch.prompts)
        metrics: dict[str, torch.Tensor] = {}
        total = None
        if isinstance(out, Mapping):
            metrics = {k: torch.as_tensor(v).reshape(-1) for k, v in out.items()}
        elif hasattr(out, "total"):
            total = torch.as_tensor(out.total).reshape(-1)
            metrics = {k: torch.as_tensor(v).reshape(-1) for k, v in getattr(out, "metrics", {}).items()}
        else:
            total = torch.as_tensor(out).reshape(-1)
        metrics = {k: self._gather(v) for k, v in metrics.items()}
        finite = all(bool(torch.isfinite(v).all()) for v in metrics.values())
        if self.combine is not None and metrics:
            total = self.combine(metrics) if finite else torch.full_like(next(iter(metrics.values())), math.nan)
            total = torch.as_tensor(total).float().reshape(-1)
        elif total is not None:
            total = self._gather(total)
        else:
            raise GRPOConfigError("the reward returned per-metric scores but no `combine` function was given to "
                                  "turn them into one reward")
        if total.numel() != self.config.batch_size:
            raise GRPOConfigError(f"the reward returned {total.numel()} scores for {self.config.batch_size} samples")
        return total, metrics

    def rollout_iteration(self, iteration: int) -> RolloutBatch:
        cfg, acc = self.config, self.accelerator
        prompts = [p for p in self.iteration_prompts(iteration) for _ in range(cfg.group_size)]
        seeds = [seed_for(cfg.seed, 1, iteration, j) for j in range(cfg.batch_size)]
        lo = acc.process_index * self.local_batch
        hi = lo + self.local_batch
        torch.manual_seed(seed_for(cfg.seed, 2, iteration, acc.process_index))  # the policy's action draws
        self.policy.eval()
        return rollout(self.pipe, self.policy, prompts[lo:hi], seeds[lo:hi],
                       num_inference_steps=cfg.num_inference_steps, height=cfg.height, width=cfg.width,
                       rollout_batch_size=cfg.rollout_batch_size, sample_kwargs=cfg.sample_kwargs)

    def update(self, batch: RolloutBatch, advantages: torch.Tensor, iteration: int) -> dict[str, float]:
        """Epochs of PPO-clip minibatches over the stored rollouts; returns averaged statistics."""
        cfg = self.config
        policy, key = self.policy, getattr(self.policy, "action_key", "r")
        policy.train()
        n, s = len(batch), batch.num_decisions
        adv = advantages.to(self.device)
        old = batch.log_probs.to(self.device)
        sums: dict[str, float] = {}
        count = 0
        first_ratio = None
        n_mb = math.ceil(n / cfg.minibatch_size)
        self.optimizer.zero_grad(set_to_none=True)
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(cfg.seed, 3, iteration, epoch)))
            for m in range(n_mb):
                idx = order[m * cfg.minibatch_size:(m + 1) * cfg.minibatch_size]
                inputs = {k: v.to(self.device) for k, v in batch.replay_inputs(idx).items()}
                logp = policy.log_prob(inputs, inputs[key]).view(len(idx), s)
                if cfg.ratio == "trajectory":
                    loss, st = ppo_clip_loss(trajectory_log_prob(logp), trajectory_log_prob(old[idx]), adv[idx],
                                             cfg.clip_eps)
                else:
                    loss, st = ppo_clip_loss(logp, old[idx], adv[idx], cfg.clip_eps)
                if first_ratio is None:
                    first_ratio = float(st["ratio/mean"])
                if self.reference is not None:
                    a, b = policy.distribution_params(inputs)
                    with torch.no_grad():
                        ra, rb = self.reference.distribution_params(inputs)
                    kl = beta_kl(a, b, ra, rb).mean()
                    loss = loss + cfg.kl_coef * kl
                    st["kl"] = kl.detach()
                (loss / cfg.gradient_accumulation).backward()
                st["loss"] = loss.detach()
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
                if (m + 1) % cfg.gradient_accumulation == 0 or m == n_mb - 1:
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + self._optimizer_step()
        stats = {f"train/{k}": v / count for k, v in sums.items() if k != "grad_norm"}
        steps = cfg.epochs * math.ceil(n_mb / cfg.gradient_accumulation)
        stats["train/grad_norm"] = sums.get("grad_norm", 0.0) / steps
        stats["train/first_ratio"] = first_ratio if first_ratio is not None else 1.0
        return stats

    def _optimizer_step(self) -> float:
        if self.accelerator.num_processes > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
            offset = 0
            for p in self.params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        if self.config.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
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
            adv = group_advantages(total, cfg.group_size, cfg.adv_eps)
            lo = self.accelerator.process_index * self.local_batch
            record.update({"skipped": 0.0, "reward/total": float(total.mean()), **advantage_stats(adv)})
            r = self._gather(batch.steps[getattr(self.policy, "action_key", "r")].flatten())
            dev = r - 0.5
            record.update({"deviation/mean": float(dev.mean()), "deviation/std": float(dev.std(unbiased=False)),
                           "deviation/min": float(dev.min()), "deviation/max": float(dev.max())})
            record.update(self.update(batch, adv[lo:lo + self.local_batch], it))
            self.scheduler.step()  # the schedule counts iterations that updated the policy
        record["lr"] = float(self.scheduler.get_last_lr()[0])
        record["bytes_per_sample_step"] = batch.stored_bytes() / max(1, len(batch) * batch.num_decisions)
        self.iteration += 1
        self.history.append(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "iteration"}, step=it)
        return record

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str] | None = None, seed: int = 0, synchronous: bool = False) -> dict[str, float]:
        """Mean raw reward (per metric) on ``prompts``, one sample per prompt from fixed seeds; prompts
        are split over processes and the scores gathered. The policy acts deterministically (the Beta
        mode); ``synchronous=True`` instead samples with the pipeline's own shared schedule from the
        same noises, the baseline a trained policy has to beat at equal steps."""
        prompts = list(self.eval_prompts if prompts is None else prompts)
        if not prompts:
            return {}
        acc, cfg = self.accelerator, self.config
        per = math.ceil(len(prompts) / acc.num_processes)
        padded = prompts + [prompts[-1]] * (per * acc.num_processes - len(prompts))
        lo = acc.process_index * per
        local = padded[lo:lo + per]
        seeds = [seed_for(seed, 5, lo + j) for j in range(per)]
        if synchronous:
            from tpm.sampler import sample

            images = []
            with torch.no_grad():
                for s in range(0, per, cfg.rollout_batch_size):
                    gens = [torch.Generator().manual_seed(int(x)) for x in seeds[s:s + cfg.rollout_batch_size]]
                    out = sample(self.pipe, local[s:s + cfg.rollout_batch_size], policy=None,
                                 num_inference_steps=cfg.num_inference_steps, height=cfg.height, width=cfg.width,
                                 generator=gens, output_type="pt", **(cfg.sample_kwargs or {}))
                    images.append(out.images.float().cpu())
            images, deviation = torch.cat(images), None
        else:
            self.policy.eval()
            batch = rollout(self.pipe, self.policy, local, seeds, num_inference_steps=cfg.num_inference_steps,
                            height=cfg.height, width=cfg.width, rollout_batch_size=cfg.rollout_batch_size,
                            sample_kwargs=cfg.sample_kwargs, explore=False)
            images = batch.images
            deviation = batch.steps[getattr(self.policy, "action_key", "r")].flatten(0, 1).reshape(per, -1)
        out = self.reward(images, local)
        if isinstance(out, Mapping):
            metrics = dict(out)
        elif hasattr(out, "metrics") and out.metrics:
            metrics = dict(out.metrics)
        else:
            metrics = {"reward": out}
        result = {}
        for k, v in metrics.items():
            g = self._gather(torch.as_tensor(v).reshape(-1))[: len(prompts)]
            result[k] = float(g.mean())
        if deviation is not None:
            r = self._gather(deviation)
            result["deviation"] = float((r[: len(prompts)] - 0.5).mean())
        return result

    # ---- the loop -----------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg, acc = self.config, self.accelerator
        self._prepare_output()
        if cfg.resume:
            path = self.latest_checkpoint()
            self.load_checkpoint(path)
            logger.info("resumed from %s at iteration %d", path, self.iteration)
        elif acc.num_processes > 1:
            from accelerate.utils import broadcast

            for p in self.policy.parameters():
                p.data.copy_(broadcast(p.data.clone(), from_process=0))
        acc.init_trackers("grpo", config={k: v for k, v in cfg.to_dict().items()
                                          if isinstance(v, (int, float, str, bool))})
        if self.eval_prompts and self.iteration == 0:
            self.initial_eval = self.evaluate()
            acc.log({f"eval/{k}": v for k, v in self.initial_eval.items()}, step=0)
        initial = self.initial_eval
        bar = tqdm(total=cfg.max_iterations, initial=self.iteration, desc="GRPO",
                   disable=not (cfg.progress and acc.is_main_process))
        while self.iteration < cfg.max_iterations:
            rec = self.train_iteration()
            bar.update(1)
            bar.set_postfix(reward=rec.get("reward/total", math.nan), skipped=int(rec["skipped"]))
            done = self.iteration == cfg.max_iterations
            if cfg.eval_every and self.iteration % cfg.eval_every == 0 and not done and self.eval_prompts:
                acc.log({f"eval/{k}": v for k, v in self.evaluate().items()}, step=self.iteration)
            if (cfg.save_every and self.iteration % cfg.save_every == 0) or done:
                self.save_checkpoint()
        bar.close()
        final = self.evaluate() if self.eval_prompts else None
        sync = self.evaluate(synchronous=True) if self.eval_prompts else None
        if final:
            acc.log({f"eval/{k}": v for k, v in final.items()}, step=self.iteration)
            acc.log({f"eval_synchronous/{k}": v for k, v in sync.items()}, step=self.iteration)
        policy_dir = os.path.join(cfg.output_dir, "policy")
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.policy.save_pretrained(policy_dir)
            with open(os.path.join(cfg.output_dir, "run.json"), "w") as f:
                json.dump({"iterations": self.iteration, "initial_eval": initial, "final_eval": final,
                           "synchronous_eval": sync,
                           "config": cfg.to_dict()}, f, indent=2)
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(cfg.output_dir, policy_dir, self.log_dir, self.iteration, self.history, initial, final,
                           sync)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _python_state(obj: list) -> tuple:
    version, internal, gauss = obj
    return (version, tuple(internal), gauss)


def _numpy_state(obj: list) -> tuple:
    name, keys, pos, has_gauss, cached = obj
    return (name, np.asarray(keys["__ndarray__"], dtype=keys["dtype"]), pos, has_gauss, cached)
