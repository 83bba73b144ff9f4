"""The held-out report of a training run: every row on the same prompts and noises, paired differences.

Rows: the synchronous sampler at the run's step count and at ``reference_steps``, every fixed
``baselines`` policy at the run's step count, the policy before training (after any warm start) and
after. Each difference against the synchronous sampler at the same steps is a paired bootstrap
interval over prompts. It is printed, written to ``report.json`` / ``report.md`` and drawn as
``report.png``; :func:`finish` also writes the config that reruns the run, and :func:`announce` the
model cards and where everything is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from tpm.app.recipe import RecipeConfig, config_yaml


def finish(run, trainer) -> dict[str, Any] | None:
    """After training: ``config.yaml`` (rerun with ``--config OUTPUT/config.yaml``) and the held-out report
    (every process evaluates; the main one writes); the report, or None without held-out prompts."""
    cfg, acc = run.cfg, run.accelerator
    g = cfg.grpo
    if acc.is_main_process:
        with open(os.path.join(g.output_dir, "config.yaml"), "w") as f:
            f.write(config_yaml(dataclasses.replace(cfg, grpo=dataclasses.replace(
                g, resume=None, overwrite=False, accept_config_changes=False))))
    if not run.eval_prompts:
        return None
    report = held_out_report(trainer, run.start, run.baselines, cfg)
    if acc.is_main_process:
        write_report(report, trainer, g.output_dir)
    return report


def announce(run, trainer, result, report: dict[str, Any] | None) -> None:
    """The main process's last words: model cards (backbone, reward, GRPO config, report) and where things are."""
    from tpm.model_card import write_run_cards

    g = run.cfg.grpo
    write_run_cards(trainer.policy.card_info(), g.output_dir, dataclasses.asdict(run.cfg), report)
    print(f"policy: {result.policy_dir}  (load with policies.load({result.policy_dir!r}))")
    if g.trackers():
        hint = f"; tensorboard --logdir {result.log_dir}" if "tensorboard" in g.trackers() else ""
        print(f"logs:   {result.log_dir}  ({', '.join(g.trackers())}{hint})")
    print(f"checkpoints: {os.path.join(g.output_dir, 'checkpoints')}")


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


