"""Train a per-patch uncertainty head on a frozen backbone (AsyncPatch §5.5).

    accelerate launch recipes/train_uncertainty.py                        # the testbed (tiny:flux if not shipped)
    accelerate launch recipes/train_uncertainty.py --model testbed:flux-asyncpatch --output-dir outputs/unc
    accelerate launch recipes/train_uncertainty.py --model stabilityai/stable-diffusion-3.5-medium \
        --num-prompts 256 --num-steps 28 --train-steps 2000

Optionally ``--config file.yaml`` (keys = the flags' field names) with command-line overrides.
Writes ``<output-dir>/head`` (config.json + model.safetensors), tensorboard logs,
``uncertainty_maps.png`` and ``report.json``; prints the report. Use the head with
``policies.UncertaintyPatches.with_head("<output-dir>/head")``. The reusable pieces (trajectory
collection, the regression, the plot) live in ``policies.uncertainty_head``; this file is the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import torch
from transformers import HfArgumentParser

from policies.uncertainty_head import UncertaintyHead, collect_trajectories, fit, head_loss, merge, plot_maps
from tpm.policy import PolicyError


@dataclass
class TrainUncertaintyConfig:
    """``recipes/train_uncertainty.py`` options (one sentence each)."""

    model: str = ""  # pipeline: testbed:NAME, tiny:flux|sd3, a local path or hub id; "" = the testbed if shipped
    output_dir: str = "outputs/uncertainty-head"  # where the head, logs, report and PNG go
    num_prompts: int = 32  # training prompts (testbed train split, or the tiny vocabulary)
    val_prompts: int = 8  # held-out prompts for the validation loss
    num_steps: int = 8  # denoising steps of each self-generated trajectory
    resolution: int | None = None  # image side in pixels for the trajectories; None = the pipeline's default
    rollout_batch: int = 8  # prompts per sampling call
    trajectory_policies: str = "synchronous,uncertainty"  # comma list: policies whose trajectories are regressed on
    hidden: int = 32  # head conv channels
    layers: int = 2  # head 3x3 conv layers
    train_steps: int = 300  # optimiser steps
    lr: float = 3e-3  # AdamW learning rate
    batch_size: int = 64  # (sample, step) rows per optimiser step
    seed: int = 0  # seeds prompts, noises and minibatches

    def __post_init__(self):
        if self.num_steps < 2:
            raise PolicyError("num_steps must be >= 2: the head regresses step k's view of step k-1's output")
        if min(self.num_prompts, self.val_prompts, self.rollout_batch, self.train_steps) < 1:
            raise PolicyError("num_prompts, val_prompts, rollout_batch and train_steps must be >= 1")


def _prompts(pipe, n: int, split: str, seed: int) -> list[str]:
    if getattr(pipe, "tpm_testbed_config", None) is not None:
        from tpm.testbed import sample_prompts

        return [item.prompt for item in sample_prompts(n, split=split, seed=seed)]
    # Words the tiny random pipelines' tokenizer knows (tpm.tiny.WORDS).
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "pink"]
    shapes = ["circle", "square", "triangle", "shark", "dog", "cat", "car", "tree"]
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
    return [f"a {colors[int(torch.randint(len(colors), (1,), generator=g))]} "
            f"{shapes[int(torch.randint(len(shapes), (1,), generator=g))]}" for _ in range(n)]


def _sample_kwargs(pipe) -> dict:
    """A testbed checkpoint's own sampling settings (size, text length, CFG); none for other pipelines."""
    if getattr(pipe, "tpm_testbed_config", None) is None:
        return {}
    from tpm.testbed.models import call_kwargs

    kw = call_kwargs(pipe)
    kw.pop("num_inference_steps", None)
    return kw


def train_uncertainty(cfg: TrainUncertaintyConfig, pipe=None) -> dict:
    """Collect trajectories, fit the head, save it, log to tensorboard, write a PNG; return a report."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    import policies
    from tpm.backbones import get_backbone
    from tpm.loading import default_model, load_model

    os.makedirs(cfg.output_dir, exist_ok=True)
    acc = Accelerator(log_with="tensorboard", project_dir=cfg.output_dir, cpu=not torch.cuda.is_available())
    acc.init_trackers("uncertainty_head", config={k: v for k, v in dataclasses.asdict(cfg).items()})
    if pipe is None:
        pipe = load_model(cfg.model or default_model(), device=str(acc.device))
    get_backbone(pipe)  # fail now, before any sampling, if the pipeline has no adapter
    kw = _sample_kwargs(pipe)
    if cfg.resolution is not None:
        kw.update(height=cfg.resolution, width=cfg.resolution)
    names = [n.strip() for n in cfg.trajectory_policies.split(",") if n.strip()]

    def collect(prompts: list[str], seed: int) -> dict[str, torch.Tensor]:
        sets = []
        chunks = [prompts[i:i + cfg.rollout_batch] for i in range(0, len(prompts), cfg.rollout_batch)]
        for j, (name, chunk) in enumerate(tqdm([(n, c) for n in names for c in chunks], desc="trajectories")):
            gen = torch.Generator().manual_seed(seed + j)
            sets.append(collect_trajectories(pipe, chunk, cfg.num_steps, policies.load(name), gen, **kw))
        return merge(sets)

    train = collect(_prompts(pipe, cfg.num_prompts, "train", cfg.seed), cfg.seed)
    val = collect(_prompts(pipe, cfg.val_prompts, "val", cfg.seed), cfg.seed + 10_000)
    c_tok = train["x0"].shape[-1]
    torch.manual_seed(cfg.seed)
    head = UncertaintyHead(token_channels=c_tok, hidden=cfg.hidden, layers=cfg.layers,
                           backbone=type(pipe).__name__)
    with torch.no_grad():
        val_before = float(head_loss(head, val))
    bar = tqdm(total=cfg.train_steps, desc="head")

    def log(step: int, loss: float):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        acc.log({"train/loss": loss}, step=step)

    losses = fit(head.to(acc.device), train, cfg.train_steps, cfg.lr, cfg.batch_size, cfg.seed, log, acc)
    bar.close()
    head = acc.unwrap_model(head).cpu().eval()
    with torch.no_grad():
        val_after = float(head_loss(head, val))
        # Baseline: one constant per time (the mean training target), i.e. what a map without
        # spatial information could do at best among constants.
        const = float(((val["target"] - train["target"].mean()) ** 2).mean())
    acc.log({"val/loss": val_after}, step=cfg.train_steps)
    acc.end_training()
    head_dir = os.path.join(cfg.output_dir, "head")
    head.save_pretrained(head_dir)
    png = plot_maps(head, val, os.path.join(cfg.output_dir, "uncertainty_maps.png"))
    return {"head": head_dir, "png": png, "rows_train": int(train["x0"].shape[0]),
            "rows_val": int(val["x0"].shape[0]), "train_loss_first": losses[0], "train_loss_last": losses[-1],
            "val_loss_untrained": val_before, "val_loss": val_after, "val_loss_constant": const,
            "backbone": type(pipe).__name__, "token_channels": c_tok}


def parse_args(argv: list[str]) -> TrainUncertaintyConfig:
    parser = HfArgumentParser(TrainUncertaintyConfig)
    if len(argv) >= 2 and argv[0] == "--config":
        import yaml

        with open(argv[1]) as f:
            parser.set_defaults(**(yaml.safe_load(f) or {}))
        argv = argv[2:]
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Parse, train, write ``report.json`` and print it; a user error (tpm's error classes are all
    ValueErrors: LoadError, PolicyError, BackboneError) becomes one line and exit status 1."""
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        report = train_uncertainty(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    with open(os.path.join(cfg.output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
