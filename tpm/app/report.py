"""The held-out report of a training run: every row on the same prompts and noises, paired differences.

Rows: the synchronous sampler at the run's step count and at ``reference_steps``, every fixed
``baselines`` policy at the run's step count, the policy before training (after any warm start,
saved in ``policy_start/``) and after. Prompts, noises and intervals follow the evaluation protocol
(:mod:`tpm.comparison.protocol`): each difference against the synchronous sampler at the same
steps is a paired bootstrap interval over prompts. It is printed, written to ``report.json`` /
``report.md`` with the ``tpm compare`` command that reproduces the table (:func:`compare_command`),
and drawn as ``report.png`` (a row per method, the prompt above each column); the training curve
goes to ``training_curve.png``. :func:`finish` also writes the config that reruns the run, and
:func:`announce` the model cards and where everything is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
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
        from tpm.grpo.curve import write_training_curve

        write_training_curve(os.path.join(g.output_dir, "training_curve.png"), trainer.history,
                             trainer.evaluations, (trainer.best or {}).get("iteration") if g.keep_best else None)
    if not run.eval_prompts:
        return None
    if acc.is_main_process:
        run.start.save_pretrained(os.path.join(g.output_dir, START_DIR))
    report = held_out_report(trainer, run.start, run.baselines, cfg)
    if acc.is_main_process:
        write_report(report, trainer, g.output_dir)
    return report


START_DIR = "policy_start"  # the policy before training (after any warm start), for the compare command


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
    from tpm.comparison.protocol import paired_difference, rounded

    k = cfg.grpo.num_inference_steps
    rows: list[tuple[str, Any, int | None]] = [(f"synchronous, {k} steps", None, k),
                                                (f"synchronous, {cfg.reference_steps} steps", None, cfg.reference_steps)]
    rows += [(f"{label}, {k} steps", pol, k) for label, pol in baselines.items()]
    rows += [("policy before training", before, k), ("policy after training", trainer.policy, k)]
    results = {label: trainer.evaluate(policy=pol, num_inference_steps=steps, keep_images=8)
               for label, pol, steps in rows}
    base = results[rows[0][0]]
    n = int(len(base.total))
    out: dict[str, Any] = {"prompts": cfg.eval_prompts, "n": n, "steps": k,
                           "noise_sets": cfg.grpo.eval_noise_sets, "selected": trainer.best, "rows": {},
                           "compare_command": compare_command(cfg, n), "compare_labels": compare_labels(cfg, k),
                           "grid_prompts": list(trainer.eval_prompts[:8])}
    for label, res in results.items():
        row = {name: round(float(np.mean(v)), 4) for name, v in res.metrics.items()}
        diffs = {}
        if label != rows[0][0]:
            for name, v in res.metrics.items():
                diffs[name] = rounded(paired_difference(v, base.metrics[name]))
        out["rows"][label] = {"mean": row, "minus_synchronous": diffs, "stats": res.stats}
    out["_images"] = {label: res.images for label, res in results.items()}
    return out


def _spec(name: str, options: dict[str, Any]) -> str:
    """``name:key=value:...``, how policies and rewards are named on a command line."""
    return ":".join([name, *(f"{k}={v}" for k, v in options.items())])


def compare_specs(cfg: RecipeConfig) -> list[tuple[str, str]]:
    """(the report's row label, the ``tpm compare --policies`` entry) of every row at the run's step count."""
    out_dir = cfg.grpo.output_dir
    k = cfg.grpo.num_inference_steps
    rows = [(f"synchronous, {k} steps", "synchronous")]
    for label, spec in cfg.baselines.items():
        opts = dict(spec)
        rows.append((f"{label}, {k} steps", _spec(opts.pop("policy"), opts)))
    rows += [("policy before training", os.path.join(out_dir, START_DIR)),
             ("policy after training", os.path.join(out_dir, "policy"))]
    return rows


def compare_labels(cfg: RecipeConfig, k: int) -> dict[str, str]:
    """The report's row label of each row of the compare command's summary."""
    labels = {spec: label for label, spec in compare_specs(cfg)}
    labels[f"synchronous, {cfg.reference_steps} steps"] = f"synchronous, {cfg.reference_steps} steps"
    return labels


def compare_command(cfg: RecipeConfig, n_prompts: int) -> str:
    """The ``tpm compare`` command that scores the report's rows on the same prompts and noises (the
    evaluation protocol's noise sets ``0 .. eval_noise_sets - 1``) with the same rewards."""
    from tpm.loading import load_prompts

    g = cfg.grpo
    everything = len(load_prompts(cfg.eval_prompts, column=cfg.prompt_column, split=cfg.eval_split))
    rewards = [_spec(name, cfg.reward_options.get(name, {})) for name in cfg.rewards]
    args = ["tpm", "compare", "--model", cfg.model, "--prompts", cfg.eval_prompts,
            *(["--num-prompts", "0"] if n_prompts >= everything else ["--first-prompts", str(n_prompts)]),
            "--seeds", str(g.eval_noise_sets), "--steps", str(g.num_inference_steps),
            "--reference-steps", str(cfg.reference_steps), "--rewards", ",".join(rewards),
            "--policies", ",".join(spec for _, spec in compare_specs(cfg))]
    args += ["--height", str(g.height)] if g.height is not None else []
    args += ["--width", str(g.width)] if g.width is not None else []
    args += ["--lora", cfg.lora] if cfg.lora is not None else []
    args += ["--prompt-column", cfg.prompt_column] if cfg.prompt_column is not None else []
    args += ["--prompt-split", cfg.eval_split] if cfg.eval_split != "train" else []
    args += ["--out", os.path.join(g.output_dir, "compare")]
    return " ".join(shlex.quote(a) for a in args)


def write_report(report: dict[str, Any], trainer, output_dir: str) -> None:
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
    named = ", ".join(f"`{spec}` = {label}" for spec, label in report["compare_labels"].items() if spec != label)
    lines += ["", "The same table from `tpm compare` (the same prompts, noises and intervals; its rows are named "
              f"{named}):", "", "```bash", report["compare_command"], "```",
              "", "report.png: a row per method, the prompt above each column (first noise set); "
              "training_curve.png: the training reward per iteration and the evaluations with their intervals."]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    grid = report_grid(images, report["grid_prompts"])
    if grid is not None:
        grid.save(os.path.join(output_dir, "report.png"))


def report_grid(images: dict[str, Any], prompts: list[str]):
    """A row of images per method (``{label: (n, 3, H, W) tensor or None}``), as many columns as every
    method has images, the prompt of each column above it; None without images."""
    from tpm.plots import image_grid

    kept = {label: batch for label, batch in images.items() if batch is not None}
    if not kept:
        return None
    cols = max(1, min(len(v) for v in kept.values()))
    tiles = [img for batch in kept.values() for img in _to_pil(batch[:cols])]
    return image_grid(tiles, cols=cols, labels_left=list(kept), labels_top=list(prompts[:cols]), cell=96)


def _to_pil(batch) -> list:
    from PIL import Image

    arr = (batch.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
